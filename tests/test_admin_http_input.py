"""The admin HTTP side against hostile input: paths no file has, keys that are not UTF-8, links
that set the dashboard's polling, request lines as long as MQTT's strings and longer; in-process,
on StringTransports."""

from __future__ import annotations

import hashlib
import json
from typing import Any
from urllib.parse import quote

import pytest
from admin_helpers import site_connection
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols.basic import LineReceiver

from mqtt_broker.testing import MemoryBroker

KEY = "operator-key-0123456789"


def _broker(**settings: Any) -> MemoryBroker:
    """A broker that takes KEY (unless ``http_api_keys`` says otherwise)."""
    keys = settings.pop("http_api_keys", ["sha256:" + hashlib.sha256(KEY.encode()).hexdigest()])
    return MemoryBroker(sys_interval=0, http_api_keys=keys, **settings)


def _site(**settings: Any) -> Any:
    return _broker(**settings).service.operations.site()


def _get(site: Any, path: bytes, headers: bytes = b"") -> bytes:
    protocol, transport = site_connection(site)
    protocol.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: broker\r\n" + headers + b"Connection: close\r\n\r\n")
    return transport.value()


# --- a path no file can have: answered 404, without a traceback in the broker's log -----------------

@pytest.mark.parametrize("path", [b"/%00", b"/index.html%00", b"/api%00/v1/health", b"/%ff", b"/%c0%ae%c0%ae/x"],
                         ids=["nul", "nul-after-file", "nul-in-api", "not-utf8", "overlong-dot"])
def test_a_path_no_static_file_can_have_is_a_plain_404(path: bytes) -> None:
    """Anyone who can reach the admin port, with no key, sent GET /%00: the dashboard's static
    files (twisted.web's File) stat a path holding a NUL, the ValueError escaped, the site
    answered 500 and logged a traceback; a segment that is not UTF-8 (GET /%ff) was a logged
    traceback too: one request each to fill the log."""
    site = _site()
    with capturedLogs() as events:
        answer = _get(site, path)
    status = answer.split(b"\r\n", 1)[0]
    failures = [(formatEvent(e) or "").splitlines()[:1] + [(e.get("log_failure") or e.get("failure")).getErrorMessage()]
                for e in events if e.get("log_failure") is not None or e.get("failure") is not None]
    assert (status, failures) == (b"HTTP/1.1 404 Not Found", [])


# --- what anyone may send without a key is logged once per thousand, its path cut -----------------

def _send(site: Any, request: bytes) -> bytes:
    protocol, transport = site_connection(site)
    protocol.dataReceived(request)
    return transport.value().split(b"\r\n", 1)[0]


def test_refusals_without_a_key_are_logged_once_per_thousand_with_their_path_cut() -> None:
    """Anyone who reaches the admin port may send them by the thousand a second: each POST or
    DELETE refused was a line, its path whole (request lines go up to 394 KB), decided before
    the key is looked at (a 404, a 405) or for the key (401, 403). An operator's refusals, with
    a key, are each logged."""
    site = _site()
    path = b"/api/v1/" + b"A" * 15000
    with capturedLogs() as events:
        for n in range(2001):
            key = b"X-API-Key: wrong\r\n" if n % 2 else b""
            assert _send(site, b"POST " + path + b" HTTP/1.1\r\nHost: broker\r\n" + key
                         + b"Content-Length: 0\r\n\r\n") == b"HTTP/1.1 404 Not Found"
        assert _send(site, b"DELETE /api/v1/retained/x HTTP/1.1\r\nHost: broker\r\nX-API-Key: wrong\r\n"
                     b"Content-Length: 0\r\n\r\n") == b"HTTP/1.1 403 Forbidden"
        for _ in range(2):
            assert _call(site, b"DELETE", b"/api/v1/clients/nobody")[0] == b"HTTP/1.1 404 Not Found"
    lines = [formatEvent(e) or "" for e in events if "admin API" in (formatEvent(e) or "")]
    assert len(lines) == 5, lines[:6]
    assert lines[0] == ("admin API: 'POST' '/api/v1/" + "A" * 248 + "... (15008 characters)' by key - refused: 404 "
                        "(1 refused without a key; logged once per thousand)")
    assert [line.rpartition(" refused: ")[2] for line in lines[1:]] == [
        "404 (1001 refused without a key; logged once per thousand)",
        "404 (2001 refused without a key; logged once per thousand)",
        "404", "404"]
    assert lines[3].startswith("admin API: 'DELETE' '/api/v1/clients/nobody' by key ")


# --- an API key is the bytes sent, not those bytes with the invalid ones replaced -------------------

def test_a_key_sent_with_bytes_that_are_not_utf8_matches_no_key() -> None:
    """A key is the bytes sent: read with errors="replace", every byte that is not UTF-8 became
    U+FFFD before hashing, and a key holding U+FFFD was matched by any other byte in its place
    (b"\\xff", b"\\xfe", ...): different secrets taken for the same key."""
    configured = "ops-key-\ufffd-0123456789"
    site = _site(http_api_keys=["sha256:" + hashlib.sha256(configured.encode()).hexdigest()])
    for sent in (b"ops-key-\xff-0123456789", b"ops-key-\xfe-0123456789"):
        status = _get(site, b"/api/v1/stats", b"Authorization: Bearer " + sent + b"\r\n").split(b"\r\n", 1)[0]
        assert status == b"HTTP/1.1 403 Forbidden", (sent, status)


# --- the dashboard's ?interval= keeps its floor of 500 ms ------------------------------------------

@pytest.mark.parametrize("interval", ["3e9", "Infinity"])
def test_the_dashboard_polls_no_faster_than_its_floor_whatever_the_link_says(interval: str) -> None:
    """dashboard.js keeps 500 ms at least between two refreshes (each some eight API calls with
    the operator's key). A link with ?interval=3e9 (or Infinity) passed that floor, and
    setTimeout takes a delay beyond 2**31-1 ms as 0 (WebIDL long: 3e9 wraps negative; Infinity
    is 0): the page refreshed as fast as the broker answered, on anyone's link. Checked with node
    on the page's own expression."""
    import re
    import shutil
    import subprocess
    from pathlib import Path

    import mqtt_broker.admin.dashboard as dashboard
    node = shutil.which("node")  # (installed by scripts/test, for the browser tests)
    assert node is not None
    script = (Path(dashboard.__file__).with_name("static") / "dashboard.js").read_text()
    [line] = re.findall(r"^const POLL_MS = .*;$", script, re.M)
    program = (f"const location = {{search: '?interval={interval}'}};\n{line}\n"
               "process.stdout.write(String(POLL_MS));")
    shown = subprocess.run([node, "-e", program], capture_output=True, text=True, timeout=60, check=True).stdout
    poll_ms = float(shown)
    # What a browser's setTimeout will wait (WebIDL "long": ToInt32, a negative delay is 0).
    as_int32 = 0 if poll_ms == float("inf") else (int(poll_ms) + 2**31) % 2**32 - 2**31
    assert max(0, as_int32) >= 500, (interval, poll_ms, as_int32)


# --- an offset past every item: an empty page ------------------------------------------------------

@pytest.mark.parametrize("path", ["/api/v1/clients", "/api/v1/clients/c/subscriptions", "/api/v1/retained",
                                  "/api/v1/retained?filter=%23", "/api/v1/subscriptions"])
def test_an_offset_past_what_a_list_holds_is_an_empty_page_however_large(path: str) -> None:
    """openapi.json takes any offset from 0; one of 2**63 or more reached itertools.islice, which
    takes no index past sys.maxsize: a 500 and a logged traceback, where /subscriptions (paged by
    hand) answered an empty page."""
    from protocol_helpers import connected
    from test_admin_pages import call, started

    broker, api = started()
    client = connected(broker, "c")
    client.subscribe("a/b", qos=1)
    client.publish("r/1", b"x", retain=True)
    offset = 2**63
    with capturedLogs() as events:
        status, answer = call(api, "GET", f"{path}{'&' if '?' in path else '?'}offset={offset}")
    assert (status, answer["items"], answer["offset"]) == (200, [], offset), answer
    assert answer["total"] >= 1
    assert [e for e in events if e.get("log_failure") is not None] == []


# --- a form body is the API's to read (it reads none), not twisted.web's to parse -------------------

def test_a_form_body_is_not_parsed_before_the_key_is_checked() -> None:
    """twisted.web's Request parses a POST body sent as application/x-www-form-urlencoded or
    multipart/form-data into request.args before any resource runs, key or no key; the API never
    reads request.args (it takes JSON, and parses its query itself). With the default
    http_max_body_size (1 MiB), one such request without a key held the reactor 300 ms
    (url-encoded) to 380 ms (multipart)."""
    site = _site()
    seen: list[tuple[Any, bool]] = []

    class Recorded(site.requestFactory):  # type: ignore[misc, name-defined]
        def process(self) -> None:
            seen.append((self.args, self.content.getvalue() == body))
            super().process()

    site.requestFactory = Recorded
    size = (1 << 20) - 16
    part = b'--B\r\nContent-Disposition: form-data; name="a"\r\n\r\nx\r\n'
    bodies = {"application/x-www-form-urlencoded": (b"a=&" * size)[:size],
              "multipart/form-data; boundary=B": part * (size // len(part)) + b"--B--\r\n"}
    for content_type, body in bodies.items():
        protocol, transport = site_connection(site)
        protocol.dataReceived(f"POST /api/v1/publish HTTP/1.1\r\nHost: broker\r\nContent-Type: {content_type}\r\n"
                              f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        assert transport.value().startswith(b"HTTP/1.1 401 "), content_type
        assert seen[-1] == ({}, False), content_type  # (nor kept: it came without a key)
        protocol, transport = site_connection(site)
        protocol.dataReceived(f"POST /api/v1/publish HTTP/1.1\r\nHost: broker\r\nAuthorization: Bearer {KEY}\r\n"
                              f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
                              "\r\n".encode() + body)
        assert transport.value().startswith(b"HTTP/1.1 400 "), content_type  # (not JSON)
        assert seen[-1] == ({}, True), content_type  # (with the key, the body kept whole, for a resource to read)


# --- a request without a key, or one that does not come whole, holds nothing for long ---------------

@pytest.mark.parametrize("key", [None, "not-" + KEY], ids=["none", "not-accepted"])
def test_the_body_of_a_request_without_an_accepted_key_is_not_kept(key: str | None) -> None:
    """The body was kept, up to http_max_body_size, until the API looked at the key once it had
    come whole: 100 POSTs without a key, each of Content-Length 1 MiB and sent 10 bytes short,
    held 120 MB for as long as their clients kept them open. It is discarded as it comes, as an
    oversized one is, and the answer is the same (401 or 403)."""
    site = _site()
    protocol, transport = site_connection(site)
    authorization = b"" if key is None else b"Authorization: Bearer " + key.encode() + b"\r\n"
    size = 1 << 20
    protocol.dataReceived(b"POST /api/v1/publish HTTP/1.1\r\nHost: broker\r\n" + authorization
                          + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % size
                          + b" " * (size - 10))
    [request] = protocol.requests
    assert request.content.tell() == 0
    protocol.dataReceived(b" " * 10)
    assert transport.value().split(b"\r\n", 1)[0] == (b"HTTP/1.1 401 Unauthorized" if key is None
                                                       else b"HTTP/1.1 403 Forbidden")


def test_the_body_of_a_request_with_an_accepted_key_is_kept_as_it_comes() -> None:
    site = _site()
    protocol, _ = site_connection(site)
    body = json.dumps({"topic": "t", "payload": "x" * 1000}).encode()
    protocol.dataReceived(b"POST /api/v1/publish HTTP/1.1\r\nHost: broker\r\nAuthorization: Bearer " + KEY.encode()
                          + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:-1])
    [request] = protocol.requests
    assert request.content.getvalue() == body[:-1]


def test_the_key_of_a_request_with_a_body_is_hashed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key of a request with a body is looked at as soon as its headers are in (to keep the
    body or not); the API then hashed it against every key again."""
    site = _site()
    keys = site.requestFactory.keys
    looked: list[str] = []

    def identify(presented: str) -> str | None:
        looked.append(presented)
        return type(keys).identify(keys, presented)
    monkeypatch.setattr(keys, "identify", identify)
    assert _call(site, b"POST", b"/api/v1/publish", body={"topic": "t", "payload": "x"})[0] == b"HTTP/1.1 200 OK"
    assert looked == [KEY]


def test_a_request_that_does_not_come_whole_within_its_deadline_is_answered_408_and_closed() -> None:
    """twisted.web's idle timeout (60 s) starts again with every byte: a request sent a byte
    every 25 s held its connection for ever, and a body held with it. A request has 60 s from
    its first byte to its last."""
    broker = _broker()
    protocol, transport = site_connection(broker.service.operations.site())
    sent = b"GET /api/v1/health HTTP/1.1\r\nHost: broker\r\n\r\n"
    for byte in range(3):
        protocol.dataReceived(sent[byte:byte + 1])
        broker.advance(25)
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.split(b"\r\n", 1)[0] == b"HTTP/1.1 408 Request Timeout" and set(json.loads(body)) == {"error"}
    assert transport.disconnecting


def test_each_request_of_a_connection_has_its_own_deadline() -> None:
    """The deadline runs from a request's first byte until it is whole: a connection that sends
    one request a minute, each whole at once, is never cut."""
    broker = _broker()
    protocol, transport = site_connection(broker.service.operations.site())
    for _ in range(3):
        protocol.dataReceived(b"GET /api/v1/health HTTP/1.1\r\nHost: broker\r\n\r\n")
        broker.advance(50)
    assert transport.value().count(b"HTTP/1.1 200 OK") == 3 and not transport.disconnecting


# --- a client id or topic filter as long as MQTT allows fits in a request line ---------------------

def _call(site: Any, method: bytes, path: bytes, headers: bytes = b"", piece: int = 4096,
          body: Any = None) -> tuple[bytes, Any]:
    """The status line and the JSON body of a request sent in pieces of ``piece`` bytes, with the key
    (and ``body`` as JSON)."""
    protocol, transport = site_connection(site)
    content = b"" if body is None else json.dumps(body).encode()
    if content:
        headers += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(content)
    sent = (method + b" " + path + b" HTTP/1.1\r\nHost: broker\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
            + headers + b"Connection: close\r\n\r\n" + content)
    for start in range(0, len(sent), piece):
        protocol.dataReceived(sent[start:start + piece])
    head, _, body = transport.value().partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], json.loads(body) if body else None


def test_a_client_whose_id_is_as_long_as_mqtt_allows_is_read_unsubscribed_and_kicked() -> None:
    """A client id of 65,535 bytes (21,845 times "\u20ac", 3 bytes each), as MQTT allows, is
    196,605 bytes percent-encoded in the request line, and with a topic filter as long after it
    twice that: twisted.web's HTTPChannel reads lines of 16 KiB at most, and closed the
    connection without an answer."""
    broker = _broker()
    client_id = topic_filter = "\u20ac" * 21_845
    client = broker.connect(client_id)
    client.subscribe(topic_filter)
    site = broker.service.operations.site()
    path = b"/api/v1/clients/" + quote(client_id, safe="").encode()
    status, body = _call(site, b"GET", path)
    assert (status, body["client_id"], body["subscription_count"]) == (b"HTTP/1.1 200 OK", client_id, 1)
    unsubscribe = path + b"/subscriptions/" + quote(topic_filter, safe="").encode()
    assert _call(site, b"DELETE", unsubscribe) == (b"HTTP/1.1 204 No Content", None)
    assert _call(site, b"DELETE", path) == (b"HTTP/1.1 200 OK", {"disconnected": client_id})
    assert client.closed


def test_the_changes_to_a_client_whose_strings_are_long_are_logged_with_them_cut() -> None:
    """A client chooses its id, the filters it holds and the topics it publishes to, each up to
    65,535 bytes: an operator's change wrote them whole into the log."""
    broker = _broker()
    client_id, topic_filter, topic = "c" * 5000, "f" * 5000, "t" * 5000
    broker.connect(client_id, version=4)
    site = broker.service.operations.site()
    path = b"/api/v1/clients/" + client_id.encode()
    with capturedLogs() as events:
        assert _call(site, b"POST", path + b"/subscriptions", body={"topic_filter": topic_filter})[0] == (
            b"HTTP/1.1 201 Created")
        assert _call(site, b"DELETE", path + b"/subscriptions/" + topic_filter.encode())[0] == b"HTTP/1.1 204 No Content"
        assert _call(site, b"POST", b"/api/v1/publish", body={"topic": topic, "payload": "x", "retain": True})[0] == b"HTTP/1.1 200 OK"
        assert _call(site, b"DELETE", b"/api/v1/retained/" + topic.encode())[0] == b"HTTP/1.1 204 No Content"
        assert _call(site, b"DELETE", path)[0] == b"HTTP/1.1 200 OK"
    lines = [formatEvent(e) or "" for e in events if "admin API: key" in (formatEvent(e) or "")]
    assert [line.count("... (5000 characters)'") for line in lines] == [2, 2, 1, 1, 1], lines
    assert all(len(line) < 700 for line in lines)


@pytest.mark.parametrize("line, headers, status", [
    (b"/api/v1/clients/" + b"%E2%82%AC" * 44_000, b"", b"HTTP/1.1 414 URI Too Long"),
    (b"/api/v1/stats", b"X-Padding: " + b"x" * 20_000 + b"\r\n", b"HTTP/1.1 431 Request Header Fields Too Large"),
    (b"/api/v1/stats", b"".join(b"X-Padding-%d: %s\r\n" % (n, b"x" * 1000) for n in range(20)),
     b"HTTP/1.1 431 Request Header Fields Too Large"),
], ids=["request-line", "header-line", "headers"])
def test_a_request_line_or_headers_past_their_limits_are_refused_with_a_json_answer(
        line: bytes, headers: bytes, status: bytes) -> None:
    """Past the limits (a request line of two MQTT strings percent-encoded; 16 KiB of headers),
    twisted.web closed the connection without a word (a line) or answered a bare 400 (headers)."""
    answer, body = _call(_site(), b"GET", line, headers)
    assert answer == status and set(body) == {"error"}


def test_a_long_request_line_that_comes_in_small_pieces_is_searched_for_its_end_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """LineReceiver joins what it holds of a line with each piece that comes and looks for the
    line's end in the whole again: a request line of 196,605 bytes that came 64 bytes at a time
    made it go through 300 MB (in pieces of a byte, 19 GB, some seconds of the reactor's time for
    each such client)."""
    searched = [0]
    received = LineReceiver.dataReceived

    def counted(self: LineReceiver, data: bytes) -> Any:
        searched[0] += len(self._buffer) + len(data)
        return received(self, data)

    monkeypatch.setattr(LineReceiver, "dataReceived", counted)
    path = b"/api/v1/clients/" + b"%E2%82%AC" * 21_845
    status, _ = _call(_site(), b"GET", path, piece=64)
    assert status == b"HTTP/1.1 404 Not Found"
    assert searched[0] < 2 * len(path)

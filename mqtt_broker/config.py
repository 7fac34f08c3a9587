"""Broker settings: one dataclass, read from TOML, keyword arguments or the command line.

Names follow Mosquitto's where Mosquitto has the setting, so its users' knowledge carries over.
"""

from __future__ import annotations

import codecs
import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping


class ConfigError(ValueError):
    """A setting that is unknown or has a bad value, or a file that cannot be read.

    ``str(error)`` names the file (when there is one) and the key; ``source``, ``key`` and
    ``reason`` hold the parts, so the command line can name its flag instead of the key.
    """

    def __init__(self, reason: str, key: str | None = None, source: str | None = None) -> None:
        self.reason, self.key, self.source = reason, key, source
        super().__init__(": ".join(part for part in (source, key, reason) if part))


def _setting(default: Any, help: str, minimum: float | None = 0, maximum: float | None = None,
             choices: tuple[str, ...] | None = None, check: Callable[[Any], str | None] | None = None,
             table: Callable[[Mapping[str, Any]], Any] | None = None, secret: bool = False) -> Any:
    """``check(value)`` returns why a value is refused, or None. ``table``: the setting is a list
    of TOML tables (``[[name]]``), each made into an object by ``table(mapping)``; it has no
    command-line flag. ``secret``: the value may hold a password or a key, so an error of its
    type names the type only, never the value."""
    metadata = {"help": help, "min": minimum, "max": maximum, "choices": choices, "check": check,
                "table": table, "secret": secret}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _paths_problem(paths: list[str]) -> str | None:
    for path in paths:
        if not path.startswith("/") or any(c in path for c in " ?#\t\r\n"):
            return f"{path!r} is not a request path (/..., without a query)"
    return None


def _origins_problem(origins: list[str]) -> str | None:
    for origin in origins:
        scheme, _, host = origin.partition("://")
        if not scheme or not host or any(c in host for c in "/?# \t\r\n"):
            return f"{origin!r} is not an origin (scheme://host[:port], e.g. https://app.example.com)"
    return None


def url_without_password(url: str) -> str:
    """A URL (a setting's whole value) with its password replaced by ``********``: all from its
    ``://`` to its last ``@`` is its credentials, quotes included."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user, colon, _ = credentials.partition(":")
    return f"{scheme}://{user + ':' if colon and '/' not in user else ''}********@{host}"


def _redis_problem(url: str) -> str | None:
    if not url:
        return None
    from .cluster.address import RedisAddress  # parses only: nothing of the cluster runs
    try:
        RedisAddress.parse(url)
    except ValueError as e:
        return str(e)
    return None


def _bridge(values: Mapping[str, Any]) -> Any:
    from .bridge.config import BridgeConfig  # parses only: nothing of the bridges runs
    return values if isinstance(values, BridgeConfig) else BridgeConfig.from_mapping(values)


def _filters_problem(filters: list[str]) -> str | None:
    from .topics import valid_topic_filter
    for topic_filter in filters:
        if not valid_topic_filter(topic_filter):
            return f"{topic_filter!r} is not a topic filter"
        # (No message is published on either: the log would stay empty, without a word.)
        if topic_filter.startswith("$share/"):
            return f"{topic_filter!r} names a shared subscription: give the filter itself"
        if topic_filter.startswith("$replay/"):
            return f"{topic_filter!r} is how a SUBSCRIBE asks for the log: give the filter itself"
    return None


def _utf8_problem(text: str, most: int | None = None) -> str | None:
    """An MQTT string must be UTF-8 [MQTT-1.5.4-1]: a byte that is not, given on the command line,
    arrives as a lone surrogate. With ``most``, at most so many bytes."""
    try:
        encoded = text.encode()
    except UnicodeEncodeError:
        return "not UTF-8, as an MQTT string must be"
    return f"longer than {most} bytes" if most is not None and len(encoded) > most else None


def _prefix_problem(prefix: str) -> str | None:
    # An assigned id is the prefix and 32 hex digits, sent as a UTF-8 string (at most 65535 bytes).
    return _utf8_problem(prefix, 65535 - 32)


def _response_information_problem(template: str) -> str | None:
    # Sent as a UTF-8 string of at most 65535 bytes; too long with a client id, it is left out.
    return _utf8_problem(template.replace("{client_id}", ""), 65535)


def _proxies_problem(proxies: list[str]) -> str | None:
    import ipaddress
    for proxy in proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            return f"{proxy!r} is not an IP address or network"
    return None


def _api_keys_problem(keys: list[str]) -> str | None:
    for number, key in enumerate(keys, 1):
        if not re.fullmatch(r"(?:[A-Za-z0-9_.-]+:)?sha256:[0-9a-f]{64}", key):
            # Not echoed: it may be a key itself, pasted where its hash belongs.
            return (f"entry {number} is not a hashed key (sha256:<64 hex digits>, optionally "
                    f"name:sha256:...); python -m mqtt_broker.admin.keys makes one")
    return None


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    """Every broker setting, validated when built: a bad value raises ConfigError naming the key.

    Ints are accepted where a float is expected; a bool is never accepted for a number.
    ``mqttbroker.example.toml`` lists each setting with the default of ``twistd mqttbroker``
    (``tap.TWISTD_DEFAULTS``; a test keeps it in step).
    """

    endpoints: list[str] = _setting(
        ["tcp:1883"], "Twisted endpoint strings to listen on (tcp:, ssl:, unix:, ...).")
    max_packet_size: int = _setting(
        16 * 1024 * 1024, "Largest packet accepted from a client, in bytes; larger ones close "
        "the connection (MQTT 5: DISCONNECT 0x95). Above 268,435,455 (which MQTT 5 clients "
        "are told in CONNACK): the protocol's own limit, 268,435,460.", 2, 268_435_460)
    max_inflight_messages: int = _setting(
        20, "QoS 1/2 messages sent to a client and not yet acknowledged, per client.", 1, 65535)
    max_queued_messages: int = _setting(
        1000, "Messages queued in memory per client while it is offline or slow; 0 for no limit. "
        "With a store, QoS 1/2 messages beyond it wait in the store (up to max_stored_messages), "
        "but for the retained messages sent for a new subscription; without one, or for QoS 0, "
        "they are dropped and counted.")
    max_queued_bytes: int = _setting(
        0, "Payload bytes queued in memory per client; 0 for no limit (an empty queue takes one "
        "message of any size, as Mosquitto's does). Beyond it, as for max_queued_messages.")
    max_held_bytes: int = _setting(
        1_048_576, "Encoded bytes a connection holds while its socket is full, before messages wait "
        "in its session's queue instead (bounded by max_queued_messages and max_queued_bytes), and "
        "nothing more is read from the client until it reads; also the most moved from a queue to a "
        "connection at once.", 65536, None)
    max_stored_messages: int = _setting(
        0, "QoS 1/2 messages of one client kept in the store beyond its in-memory queue; 0 for no "
        "limit. Beyond it the message is dropped for that client and counted, and an MQTT 5 "
        "publisher gets reason code 0x97 (quota exceeded); the client's messages that expired are "
        "deleted then (every 10 seconds at most; not from a cluster's Redis), making room for the "
        "next ones.")
    queue_qos0_messages: bool = _setting(
        False, "Queue QoS 0 messages for offline persistent sessions too.")
    max_keepalive: int = _setting(
        65535, "Largest keepalive a client may ask for, in seconds. An MQTT 3 client asking "
        "for more is refused with 'identifier rejected', as in Mosquitto, and so is one asking for "
        "0 (no keepalive) when this is below 65535; an MQTT 5 client is given this value instead. "
        "0 for no limit, as in Mosquitto.", 0, 65535)
    max_connections: int = _setting(
        -1, "Simultaneous client connections; -1 for no limit.", -1)
    max_connections_per_minute: int = _setting(
        0, "CONNECTs accepted per client id per minute; more are refused (MQTT 5: 0x9F connection rate "
        "exceeded; MQTT 3: server unavailable), counted and logged once per thousand (refused ones do not "
        "count against the limit); 0 for no limit.")
    max_subscriptions_per_client: int = _setting(
        0, "Subscriptions one client may hold; more are refused (SUBACK 0x97 quota exceeded; MQTT 3: "
        "0x80), logged and counted; 0 for no limit.")
    max_qos: int = _setting(2, "Highest QoS the broker accepts and grants.", 0, 2)
    retain_available: bool = _setting(True, "Whether retained messages are supported.")
    allow_zero_length_clientid: bool = _setting(
        True, "Accept an empty client id (with clean session) and assign one.")
    auto_id_prefix: str = _setting("auto-", "Prefix of the client ids the broker assigns.", check=_prefix_problem)
    persistent_client_expiration: int = _setting(
        0, "Seconds after which a disconnected session that would otherwise never expire (MQTT 3's clean "
        "session 0, MQTT 5's interval 4294967295; not a bridge's session here) is discarded, as in "
        "Mosquitto; 0 for never. A session "
        "keeps the value it was given: set where it was 0, it applies to the sessions restored at start "
        "that had none; changed, it does not change those given the old one.", 0, 0xFFFFFFFF)
    connect_timeout: float = _setting(
        10.0, "Seconds a new connection has to send CONNECT before it is closed, and a client "
        "without keepalive to be connected after it (enhanced authentication, hooks); 0 for no "
        "limit (then a silent connection is kept for ever).")
    hook_timeout: float = _setting(
        30.0, "Seconds a hook (and each of its handlers) may take to answer with a Deferred; past "
        "it the handler is cancelled and the operation refused, as when a handler fails; 0 for no "
        "limit (then a handler that never answers holds its client for ever).")
    close_linger: float = _setting(
        2.0, "Seconds a connection the broker closes (DISCONNECT, refused CONNACK, protocol error) "
        "stays half-open, reading and discarding what the client still sends, so that the client "
        "reads the broker's last packet instead of a connection reset; it is aborted at the end. "
        "0 closes at once (once what was written is out; a client that does not take it within 5 s "
        "is aborted).", 0, 60)
    retry_interval: float = _setting(
        20.0, "Seconds before an unacknowledged QoS 1/2 message is sent again to an MQTT 3 "
        "client on the same connection; 0 to resend only on reconnect. MQTT 5 forbids "
        "resending on a live connection, so it only ever resends on reconnect.")
    set_tcp_nodelay: bool = _setting(True, "Disable Nagle's algorithm on client sockets.")
    connection_messages: bool = _setting(
        False, "Log every connection accepted and every client's own DISCONNECT (Mosquitto's "
        "default). Off, only the connections the broker refuses or closes are logged: a log "
        "line costs more than the rest of a short connection's work.")
    listen_backlog: int = _setting(
        1024, "Length of the listen queue of endpoints that do not set one themselves (backlog=, "
        "or by position as in tcp:1883:0.0.0.0:128; the kernel caps it at net.core.somaxconn).", 1, 65535)
    max_topic_alias: int = _setting(
        10, "MQTT 5: topic aliases a client may set on its PUBLISHes (0 turns them off).", 0, 65535)
    max_topic_alias_broker: int = _setting(
        10, "MQTT 5: topic aliases the broker uses towards a client, at most the client's own "
        "maximum; the most recently used topics keep theirs.", 0, 65535)
    max_session_expiry_interval: int = _setting(
        0xFFFFFFFF, "Longest session expiry interval granted, in seconds (4294967295: a session may "
        "never expire); MQTT 3's clean session 0 asks for one that never expires, so it is held to it too. "
        "Not a bridge's session here, which never expires.", 0, 0xFFFFFFFF)
    wildcard_subscription_available: bool = _setting(
        True, "Whether + and # may be used in subscriptions (MQTT 5 clients are told).")
    subscription_identifier_available: bool = _setting(
        True, "MQTT 5: whether subscription identifiers are supported.")
    shared_subscription_available: bool = _setting(
        True, "Whether $share/{group}/{filter} subscriptions are supported.")
    allow_anonymous: bool = _setting(
        True, "Accept clients that connect without a username (they get the acl_file rules "
        "written before any user line); with no authenticator (password_file, JWT, HTTP), also "
        "take the usernames clients give as they are. False with no authenticator refuses every "
        "client, as Mosquitto does. Mosquitto 2 defaults to false; set false whenever clients "
        "must authenticate.")
    password_file: str = _setting(
        "", "Mosquitto password file (username:$7$... or $6$... lines, as mosquitto_passwd or "
        "mqttbroker-passwd write them); empty for none.")
    acl_file: str = _setting(
        "", "Mosquitto ACL file (topic, user and pattern lines) checked on every publish and "
        "delivery; empty for none (every client may do everything).")
    require_certificate: bool = _setting(
        False, "Refuse clients that did not present a client certificate verified by an mqtts: "
        "endpoint (0x87), whatever endpoint they came in by.")
    use_identity_as_username: bool = _setting(
        False, "Take the username from the client's verified certificate (see "
        "certificate_identity) instead of the CONNECT packet, and check no password; clients "
        "without one are refused.")
    certificate_identity: str = _setting(
        "cn", "The part of a client certificate that names the client: cn (common name), "
        "subject (RFC 2253 as Mosquitto's use_subject_as_username writes it), or the first dns, email or uri subject alternative name.",
        choices=("cn", "subject", "dns", "email", "uri"))
    jwt_secret_file: str = _setting(
        "", "File holding the HMAC secret (32 bytes or more) of HS256/HS384/HS512 tokens sent as "
        "the password; empty for none.")
    jwt_public_key_file: str = _setting(
        "", "PEM public key or certificate for RS*, PS*, ES* or EdDSA tokens sent as the "
        "password; empty for none.")
    jwt_jwks_file: str = _setting(
        "", "JSON Web Key Set file of token keys (a token's kid picks one); empty for none.")
    jwt_algorithms: str = _setting(
        "", "Comma-separated token algorithms accepted (e.g. RS256,ES256); empty for every one "
        "that fits a configured key. none is never accepted.")
    jwt_issuer: str = _setting(
        "", "The iss claim tokens must carry; empty to accept any issuer.")
    jwt_audience: str = _setting(
        "", "The aud claim tokens must carry; empty to refuse tokens that carry one.")
    jwt_leeway: int = _setting(
        0, "Seconds of clock difference allowed when checking a token's exp, nbf and iat.", 0, 86400)
    jwt_username_claim: str = _setting(
        "sub", "Token claim that is the client's username (a CONNECT username must equal it); "
        "empty to take the CONNECT username unchecked.")
    jwt_publish_claim: str = _setting(
        "publish", "Token claim listing the topic filters the client may publish to. A token "
        "with this or the subscribe claim replaces acl_file for its client.")
    jwt_subscribe_claim: str = _setting(
        "subscribe", "Token claim listing the topic filters the client may subscribe to and "
        "receive from.")
    http_auth_url: str = _setting(
        "", "URL the broker POSTs each connecting client's credentials to, for a verdict (see "
        "http_auth_mode); empty for none. Credentials for the service itself go in "
        "http_auth_authorization_file, not in the URL.", secret=True)
    http_auth_mode: str = _setting(
        "json", "json (the broker's JSON request and answer) or introspection (the password is an "
        "OAuth2 token, checked at an RFC 7662 introspection endpoint).",
        choices=("json", "introspection"))
    http_auth_authorization_file: str = _setting(
        "", "File holding the Authorization header value the broker sends to http_auth_url "
        "(e.g. Basic ... for an introspection endpoint); empty to send none.")
    http_auth_timeout: float = _setting(
        5.0, "Seconds to wait for http_auth_url's answer before refusing the client (0x88); 0 "
        "for no limit.")
    http_auth_cache_seconds: float = _setting(
        60.0, "Seconds an answer of http_auth_url is reused for the same credentials; 0 to ask "
        "every time.")
    http_auth_cache_size: int = _setting(
        10000, "Answers of http_auth_url kept in the cache at most.")
    persistence: str = _setting(
        "memory", "Where sessions, queued messages and retained messages are kept: memory (lost "
        "when the broker stops) or sqlite (in data_dir; the default of twistd mqttbroker).",
        choices=("memory", "sqlite"))
    data_dir: str = _setting(
        "mqttbroker-data", "Directory of the SQLite store (mqttbroker.db), relative to the "
        "working directory.")
    persistence_synchronous: str = _setting(
        "normal", "SQLite synchronous mode: normal (an acknowledged message survives a crash of "
        "the broker process) or full (it also survives a crash of the operating system or a "
        "power loss, at the cost of an fsync per batch).", choices=("normal", "full"))
    cluster: str = _setting(
        "", "Redis URL of the cluster this broker is a node of (redis://host:6379/0, rediss:// for "
        "TLS, redis+sentinel://host:26379,host2:26379/mymaster/0 through Sentinel; a password as "
        "redis://:password@host). Sessions, retained messages and messages between nodes are then "
        "kept in Redis (persistence and data_dir's database are not used). Empty: no cluster.",
        check=_redis_problem, secret=True)
    cluster_tls_ca_file: str = _setting(
        "", "CA certificates (PEM) that a rediss:// Redis's certificate must chain to (refused "
        "with a redis:// or redis+sentinel:// URL: those have no TLS); empty: the platform's "
        "trusted CAs. Its name is checked against the URL's host either way.")
    cluster_node_id: str = _setting(
        "", "This node's id in the cluster; empty: an id made at the first start and kept in "
        "data_dir (cluster-node-id). Two nodes must never share one: a node started with the id "
        "of one that still beats stops.")
    cluster_heartbeat: float = _setting(
        1.0, "Seconds between a node's heartbeats in Redis.", 0.05, 60)
    cluster_missed_heartbeats: int = _setting(
        3, "Heartbeats a node may miss before the others take it for dead and adopt its "
        "sessions (one survivor publishes its clients' wills).", 2, 100)
    cluster_inbox_maxlen: int = _setting(
        1_000_000, "Entries kept at most in a node's Redis inbox (XADD MAXLEN ~), each a batch of "
        "messages for that node; older ones are trimmed.", 1000, 2**31 - 1)
    cluster_claim_timeout: float = _setting(
        5.0, "Seconds a CONNECT waits for Redis to hand over the client's session before the "
        "client is refused (0x88 Server unavailable, 3 for MQTT 3).", 0.1, 600)
    history_filters: list[str] = _setting(
        [], "Topic filters whose messages are kept in the message log, for subscribers that ask "
        "to replay them (see docs/message-log.md); empty for none.", check=_filters_problem)
    history_max_messages: int = _setting(
        10000, "Messages kept per history filter; 0 for no limit.")
    history_max_age: float = _setting(
        0.0, "Seconds a logged message is kept; 0 for no limit.")
    history_max_bytes: int = _setting(
        0, "Bytes of the messages (topic, payload and properties) kept per history filter; 0 for no limit.")
    response_information: str = _setting(
        "response/{client_id}", "MQTT 5: the Response Information sent to a client that asks "
        "for it ({client_id} is replaced); empty to send none.", check=_response_information_problem)
    websocket_endpoints: list[str] = _setting(
        [], "Twisted endpoint strings to listen on for MQTT over WebSocket (tcp:8083, "
        "ssl:8084:privateKey=...:certKey=...); empty for none.")
    websocket_paths: list[str] = _setting(
        [], "Request paths WebSocket clients may use (e.g. [\"/mqtt\"]); empty to accept any path.",
        check=_paths_problem)
    websocket_compression: bool = _setting(
        False, "Accept WebSocket per-message compression (permessage-deflate) when a client offers "
        "it; off by default because it costs CPU for every message and memory for every connection "
        "(about 30 to 80 KiB more).")
    websocket_max_frame_size: int = _setting(
        0, "Largest WebSocket frame payload accepted, in bytes; a larger frame closes the "
        "connection (close code 1009). 0: no bound of its own (a frame may hold several packets, "
        "each bounded by max_packet_size, and is read as it arrives).", 0, 2**63 - 1)
    websocket_max_handshake_size: int = _setting(
        16384, "Largest WebSocket opening handshake (HTTP request line and headers) accepted, in "
        "bytes; a larger one is refused with HTTP 431.", 1024, 1024 * 1024)
    websocket_handshake_timeout: float = _setting(
        10.0, "Seconds a new WebSocket connection has to finish its TLS and HTTP upgrade "
        "handshakes before it is dropped; 0 for no limit. connect_timeout applies after it.")
    websocket_trusted_proxies: list[str] = _setting(
        [], "Addresses or networks (10.0.0.0/8) of reverse proxies trusted to give the client's "
        "address in X-Forwarded-For; from any other peer the header is ignored.",
        check=_proxies_problem)
    websocket_origins: list[str] = _setting(
        [], "Origins (scheme://host[:port], e.g. https://app.example.com) of the web pages that may "
        "open MQTT over WebSocket: a browser's handshake from another page is refused with HTTP 403 "
        "(a client that sends no Origin, not a browser, is let in). Empty: any page.",
        check=_origins_problem)
    sys_interval: float = _setting(
        10.0, "Seconds between updates of the $SYS/broker/... topics (Mosquitto's names, published "
        "retained through the broker, so ACLs apply); 0 turns them off, otherwise at least 0.1.", 0, None,
        check=lambda seconds: f"{seconds!r} is out of range (0, or 0.1..inf)" if 0 < seconds < 0.1 else None)
    http_endpoints: list[str] = _setting(
        [], "Twisted endpoint strings for the admin HTTP site: the JSON API under /api/v1, "
        "Prometheus metrics at /metrics and the dashboard at / (tcp:8080, "
        "ssl:8443:privateKey=...:certKey=...); empty for none.")
    http_api_keys: list[str] = _setting(
        [], "Keys of the admin API, hashed: \"sha256:<hex>\" or \"name:sha256:<hex>\" (the name, "
        "or the hash's first 8 digits, is logged with every change it makes); "
        "python -m mqtt_broker.admin.keys makes a key and its hash. Empty: only health, readiness, "
        "metrics and the dashboard page answer.", check=_api_keys_problem, secret=True)
    http_metrics_auth: bool = _setting(
        False, "Require an API key for /metrics too (Prometheus sends it as a bearer token).")
    http_max_body_size: int = _setting(
        1048576, "Largest request body the admin API accepts, in bytes; a larger one is "
        "answered 400.", 1, 2**31 - 1)
    http_websocket: bool = _setting(
        False, "Serve MQTT over WebSocket at /mqtt on the admin HTTP endpoints too.")
    bridge: list[Any] = _setting(
        [], "Bridges to other brokers, one [[bridge]] table each, with Mosquitto's bridge settings "
        "(connection, addresses, topic, remote_clientid, ...; see docs/bridges.md).", table=_bridge,
        secret=True)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = type(f.default) if f.default is not dataclasses.MISSING else list
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                try:
                    value = float(value)
                except OverflowError:  # (TOML's integers have no bound)
                    raise ConfigError("an integer too large to be a number of seconds", f.name) from None
            # Not echoed: a password (in a URL, a bridge's table) or an API key pasted where its hash
            # belongs, printed at start, logged on SIGHUP and answered by the admin API's reload.
            shown = f"a {type(value).__name__}" if f.metadata["secret"] else repr(value)
            table = f.metadata.get("table")
            # bool is an int subclass: "max_qos = true" is a mistake, not 1.
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                expected = f"a list of [[{f.name}]] tables" if table is not None else kind.__name__
                raise ConfigError(f"expected {expected}, got {shown}", f.name)
            if table is not None:
                value = self._tables(f.name, value, table)
            elif kind is list:
                if not all(isinstance(item, str) for item in value):
                    raise ConfigError(f"expected a list of strings, got {shown}", f.name)
                value = list(value)  # the caller's list is not ours to share
            # No path, endpoint or MQTT string may hold it [MQTT-1.5.4-2]: refused here rather than
            # met later as a traceback (a file that cannot be opened) or a malformed CONNACK.
            if (kind is str and "\x00" in value) or (kind is list and table is None and any("\x00" in v for v in value)):
                raise ConfigError("holds U+0000", f.name)
            # TOML has nan and inf; a timer cannot be scheduled at either.
            if kind is float and not math.isfinite(value):
                raise ConfigError(f"expected a finite number, got {value!r}", f.name)
            low, high = f.metadata["min"], f.metadata["max"]
            if kind in (int, float) and ((low is not None and value < low) or (high is not None and value > high)):
                raise ConfigError(f"{value!r} is out of range "
                                  f"({low if low is not None else '-inf'}..{high if high is not None else 'inf'})",
                                  f.name)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"{value!r} is not one of {', '.join(choices)}", f.name)
            check = f.metadata.get("check")
            problem = check(value) if check is not None else None
            if problem:
                raise ConfigError(problem, f.name)
            object.__setattr__(self, f.name, value)
        # Taken with another URL, it would promise TLS while the node talks to Redis in clear
        # text, its password too.
        if self.cluster_tls_ca_file and self.cluster and not self._cluster_tls():
            raise ConfigError("is for a rediss:// cluster URL (TLS): redis:// and redis+sentinel:// "
                              "connect in clear text", "cluster_tls_ca_file")
        # One node runs a bridge at a time, and the next takes its sessions, here and at the
        # remote: named after each node's host, they would be as many as the nodes.
        if self.cluster:
            for number, bridge in enumerate(self.bridge, 1):
                if not bridge.remote_clientid:
                    raise ConfigError("must be given with cluster: the nodes run the bridge in turn, under one "
                                      "client id (left out, it is each host's name)", f"bridge[{number}].remote_clientid")

    def _cluster_tls(self) -> bool:
        from .cluster.address import RedisAddress  # parses only (the URL was checked already)
        return RedisAddress.parse(self.cluster).tls

    @staticmethod
    def _tables(name: str, value: list[Any], table: Callable[[Mapping[str, Any]], Any]) -> list[Any]:
        made = []
        for number, item in enumerate(value, 1):
            if not isinstance(item, Mapping) and not dataclasses.is_dataclass(item):
                raise ConfigError(f"expected a list of [[{name}]] tables, entry {number} is a "
                                  f"{type(item).__name__}", name)
            try:
                made.append(table(item))  # type: ignore[arg-type]
            except ValueError as e:
                key = getattr(e, "key", None)
                raise ConfigError(getattr(e, "reason", str(e)), f"{name}[{number}]" + (f".{key}" if key else "")) from None
        for attribute in ("connection", "local_client_id", "remote_client_id"):
            seen = [getattr(item, attribute) for item in made]
            twice = {x for x in seen if seen.count(x) > 1}
            if twice:
                raise ConfigError(f"two bridges share the {attribute} {sorted(twice)[0]!r}", name)
        return made

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str | None = None) -> BrokerConfig:
        """Build a config from ``{setting: value}``; raises ConfigError naming ``source`` and the key."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError("unknown setting", str(key), source)
        try:
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(e.reason, e.key, source) from None

    @classmethod
    def from_file(cls, path: str | Path, base: BrokerConfig | None = None) -> BrokerConfig:
        """Read a TOML file, over the settings of ``base`` if given; raises ConfigError naming
        the file and key on any problem."""
        try:
            with open(path, "rb") as f:
                # (with the byte order mark Windows' Notepad writes, which no editor shows)
                values = tomllib.loads(f.read().removeprefix(codecs.BOM_UTF8).decode())
        except OSError as e:
            raise ConfigError(f"cannot read: {e.strerror}", source=str(path)) from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"not valid TOML: {e}", source=str(path)) from None
        except UnicodeDecodeError as e:  # tomllib decodes before parsing and lets this through
            raise ConfigError(f"not valid TOML: not UTF-8 ({e.reason} at byte {e.start})",
                              source=str(path)) from None
        except ValueError as e:  # an integer past Python's limit on digits (sys.get_int_max_str_digits)
            raise ConfigError(f"not valid TOML: {e}", source=str(path)) from None
        except RecursionError:  # tomllib recurses once per level of arrays or inline tables
            raise ConfigError("not valid TOML: nested too deeply", source=str(path)) from None
        defaults = dataclasses.asdict(base) if base is not None else {}
        return cls.from_mapping({**defaults, **values}, str(path))

    def replace(self, **changes: Any) -> BrokerConfig:
        """A copy with some settings changed, validated like the original; raises ConfigError."""
        return self.from_mapping({**dataclasses.asdict(self), **changes})


def settings() -> list[dataclasses.Field[Any]]:
    """The settings, in declaration order, for documentation and the command line."""
    return list(dataclasses.fields(BrokerConfig))

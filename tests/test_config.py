"""BrokerConfig: defaults, validation of every setting, TOML files and the example file."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from twisted.python import usage

from mqtt_broker.config import BrokerConfig, ConfigError, settings
from mqtt_broker.tap import TWISTD_DEFAULTS, Options

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "mqttbroker.example.toml"

DEFAULTS: dict[str, Any] = {
    "endpoints": ["tcp:1883"],
    "max_packet_size": 16 * 1024 * 1024,
    "max_inflight_messages": 20,
    "max_queued_messages": 1000,
    "max_queued_bytes": 0,
    "max_held_bytes": 1_048_576,
    "max_stored_messages": 0,
    "queue_qos0_messages": False,
    "max_keepalive": 65535,
    "max_connections": -1,
    "max_connections_per_minute": 0,
    "max_subscriptions_per_client": 0,
    "max_qos": 2,
    "retain_available": True,
    "allow_zero_length_clientid": True,
    "auto_id_prefix": "auto-",
    "persistent_client_expiration": 0,
    "connect_timeout": 10.0,
    "hook_timeout": 30.0,
    "close_linger": 2.0,
    "retry_interval": 20.0,
    "set_tcp_nodelay": True,
    "connection_messages": False,
    "listen_backlog": 1024,
    "max_topic_alias": 10,
    "max_topic_alias_broker": 10,
    "max_session_expiry_interval": 0xFFFFFFFF,
    "wildcard_subscription_available": True,
    "subscription_identifier_available": True,
    "shared_subscription_available": True,
    "allow_anonymous": True,
    "password_file": "",
    "acl_file": "",
    "require_certificate": False,
    "use_identity_as_username": False,
    "certificate_identity": "cn",
    "jwt_secret_file": "",
    "jwt_public_key_file": "",
    "jwt_jwks_file": "",
    "jwt_algorithms": "",
    "jwt_issuer": "",
    "jwt_audience": "",
    "jwt_leeway": 0,
    "jwt_username_claim": "sub",
    "jwt_publish_claim": "publish",
    "jwt_subscribe_claim": "subscribe",
    "http_auth_url": "",
    "http_auth_mode": "json",
    "http_auth_authorization_file": "",
    "http_auth_timeout": 5.0,
    "http_auth_cache_seconds": 60.0,
    "http_auth_cache_size": 10000,
    "persistence": "memory",
    "data_dir": "mqttbroker-data",
    "persistence_synchronous": "normal",
    "cluster": "",
    "cluster_tls_ca_file": "",
    "cluster_node_id": "",
    "cluster_heartbeat": 1.0,
    "cluster_missed_heartbeats": 3,
    "cluster_inbox_maxlen": 1_000_000,
    "cluster_claim_timeout": 5.0,
    "history_filters": [],
    "history_max_messages": 10000,
    "history_max_age": 0.0,
    "history_max_bytes": 0,
    "response_information": "response/{client_id}",
    "websocket_endpoints": [],
    "websocket_paths": [],
    "websocket_compression": False,
    "websocket_max_frame_size": 0,
    "websocket_max_handshake_size": 16384,
    "websocket_handshake_timeout": 10.0,
    "websocket_trusted_proxies": [],
    "websocket_origins": [],
    "sys_interval": 10.0,
    "http_endpoints": [],
    "http_api_keys": [],
    "http_metrics_auth": False,
    "http_max_body_size": 1048576,
    "http_websocket": False,
    "bridge": [],
}

# Values just outside each numeric setting's range, and the extremes that are still accepted.
OUT_OF_RANGE: dict[str, list[Any]] = {
    "max_packet_size": [1, 268_435_461],      # remaining length <= 268,435,455 plus a 5-byte header
    "max_inflight_messages": [0, 65536],      # an MQTT 5 receive maximum is 1..65535
    "max_queued_messages": [-1],
    "max_queued_bytes": [-1],
    "max_held_bytes": [65535],
    "max_stored_messages": [-1],
    "history_max_messages": [-1],
    "history_max_age": [-1.0],
    "history_max_bytes": [-1],
    "max_keepalive": [-1, 65536],             # the keepalive field is two bytes
    "max_connections": [-2],
    "max_connections_per_minute": [-1],
    "max_subscriptions_per_client": [-1],
    "max_qos": [-1, 3],
    "persistent_client_expiration": [-1, 2**32],  # (SQLite holds no more than 2**63 - 1)
    "connect_timeout": [-0.5],
    "hook_timeout": [-0.5],
    "close_linger": [-0.5, 60.5],
    "cluster_heartbeat": [0.0, 60.5],
    "cluster_missed_heartbeats": [1, 101],
    "cluster_inbox_maxlen": [999, 2**31],
    "cluster_claim_timeout": [0.05, 600.5],
    "retry_interval": [-1.0],
    "listen_backlog": [0, 65536],
    "max_topic_alias": [-1, 65536],           # a two-byte property
    "max_topic_alias_broker": [-1, 65536],
    "max_session_expiry_interval": [-1, 2**32],  # a four-byte property
    "jwt_leeway": [-1, 86401],
    "http_auth_timeout": [-0.5],
    "http_auth_cache_seconds": [-1.0],
    "http_auth_cache_size": [-1],
    "websocket_max_frame_size": [-1, 2**63],  # a 63-bit frame length
    "websocket_max_handshake_size": [1023, 1024 * 1024 + 1],
    "websocket_handshake_timeout": [-0.5],
    "sys_interval": [-0.5, 0.001, 0.099],  # each update publishes some forty retained topics
    "http_max_body_size": [0, 2**31],
}
IN_RANGE: dict[str, list[Any]] = {
    "max_packet_size": [2, 268_435_460],
    "max_inflight_messages": [1, 65535],
    "max_queued_messages": [0, 10**9],
    "max_queued_bytes": [0, 2**40],
    "max_held_bytes": [65536, 2**30],
    "max_stored_messages": [0, 10**9],
    "history_max_messages": [0, 10**6],
    "history_max_age": [0.0, 86400.0],
    "history_max_bytes": [0, 2**30],
    "max_keepalive": [0, 65535],
    "max_connections": [-1, 0, 100_000],
    "max_connections_per_minute": [0, 10_000],
    "max_subscriptions_per_client": [0, 10**6],
    "max_qos": [0, 1, 2],
    "persistent_client_expiration": [0, 86400 * 365, 2**32 - 1],
    "connect_timeout": [0.0, 0.25, 3600.0],
    "hook_timeout": [0.0, 0.25, 3600.0],
    "close_linger": [0.0, 0.5, 60.0],
    "cluster_heartbeat": [0.05, 1.0, 60.0],
    "cluster_missed_heartbeats": [2, 100],
    "cluster_inbox_maxlen": [1000, 2**31 - 1],
    "cluster_claim_timeout": [0.1, 600.0],
    "retry_interval": [0.0, 1.5],
    "listen_backlog": [1, 65535],
    "max_topic_alias": [0, 65535],
    "max_topic_alias_broker": [0, 65535],
    "max_session_expiry_interval": [0, 0xFFFFFFFF],
    "jwt_leeway": [0, 86400],
    "http_auth_timeout": [0.0, 0.25, 60.0],
    "http_auth_cache_seconds": [0.0, 3600.0],
    "http_auth_cache_size": [0, 10**6],
    "websocket_max_frame_size": [0, 125, 2**63 - 1],
    "websocket_max_handshake_size": [1024, 1024 * 1024],
    "websocket_handshake_timeout": [0.0, 0.5, 3600.0],
    "sys_interval": [0.0, 0.1, 0.5, 86400.0],
    "http_max_body_size": [1, 2**31 - 1],
}

# Values of the wrong type, per the type of the setting's default.
WRONG_TYPE: dict[type, list[Any]] = {
    int: ["1", 1.0, None, [1]],
    float: ["1.0", None, [1.0]],
    bool: [1, 0, "true", None],
    str: [1, None, b"auto-", ["auto-"]],
    list: ["tcp:1883", ("tcp:1883",), [1], ["tcp:1883", None], None],
}


def kind_of(f: dataclasses.Field[Any]) -> type:
    return list if f.default is dataclasses.MISSING else type(f.default)


FIELDS = settings()
# Never echoed in an error, only their type named: a password (a bridge's, or in a URL) or an API
# key, pasted where its hash belongs.
MAY_HOLD_A_SECRET = {"cluster", "http_auth_url", "http_api_keys", "bridge"}
NUMERIC = [f.name for f in FIELDS if kind_of(f) in (int, float)]


# --- defaults -----------------------------------------------------------------------------

def test_defaults() -> None:
    assert dataclasses.asdict(BrokerConfig()) == DEFAULTS
    assert [f.name for f in FIELDS] == list(DEFAULTS)


def test_default_endpoints_are_not_shared() -> None:
    first, second = BrokerConfig(), BrokerConfig()
    first.endpoints.append("tcp:1884")
    assert second.endpoints == ["tcp:1883"]
    assert BrokerConfig().endpoints == ["tcp:1883"]


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        BrokerConfig().max_qos = 1  # type: ignore[misc]


def test_every_setting_has_help() -> None:
    for f in FIELDS:
        assert f.metadata["help"].strip(), f.name


# --- validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [
    (f.name, value) for f in FIELDS for value in WRONG_TYPE[kind_of(f)]])
def test_wrong_type_names_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        BrokerConfig(**{key: value})
    assert caught.value.key == key
    assert str(caught.value).startswith(f"{key}: ")
    if key in MAY_HOLD_A_SECRET:  # only a type is named, the value's or an entry's
        named = re.search(r"(?:got|is) a (\w+)$", str(caught.value))
        entries = value if isinstance(value, list) else []
        assert named and named[1] in {type(v).__name__ for v in [value, *entries]}, str(caught.value)
    else:
        assert repr(value) in str(caught.value)


@pytest.mark.parametrize("key", NUMERIC)
@pytest.mark.parametrize("value", [True, False])
def test_bool_is_not_a_number(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        BrokerConfig(**{key: value})
    assert caught.value.key == key
    assert str(caught.value) == f"{key}: expected {type(DEFAULTS[key]).__name__}, got {value!r}"


@pytest.mark.parametrize("key,value", [(k, v) for k, values in OUT_OF_RANGE.items() for v in values])
def test_out_of_range_names_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        BrokerConfig(**{key: value})
    assert caught.value.key == key
    assert str(caught.value).startswith(f"{key}: {value!r} is out of range (")


@pytest.mark.parametrize("key,value", [(k, v) for k, values in IN_RANGE.items() for v in values])
def test_in_range_accepted(key: str, value: Any) -> None:
    assert getattr(BrokerConfig(**{key: value}), key) == value


def test_range_tables_cover_every_numeric_setting() -> None:
    assert set(OUT_OF_RANGE) == set(NUMERIC)
    assert set(IN_RANGE) == set(NUMERIC)


@pytest.mark.parametrize("key", [f.name for f in FIELDS if kind_of(f) is float])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_floats_must_be_finite(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        BrokerConfig(**{key: value})
    assert caught.value.key == key
    assert str(caught.value).startswith(f"{key}: ")


def test_ints_accepted_for_floats() -> None:
    config = BrokerConfig(connect_timeout=5, retry_interval=0)
    assert config.connect_timeout == 5.0 and type(config.connect_timeout) is float
    assert config.retry_interval == 0.0 and type(config.retry_interval) is float


def test_ints_accepted_for_floats_in_toml(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text("connect_timeout = 3\nretry_interval = 0\n")
    config = BrokerConfig.from_file(path)
    assert (config.connect_timeout, config.retry_interval) == (3.0, 0.0)
    assert type(config.connect_timeout) is float and type(config.retry_interval) is float


def test_endpoints_list_is_copied() -> None:
    mine = ["tcp:1883"]
    config = BrokerConfig(endpoints=mine)
    mine.append("tcp:1884")
    assert config.endpoints == ["tcp:1883"]


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        BrokerConfig(max_qos=3)


# --- from_mapping and files ---------------------------------------------------------------

def test_from_mapping() -> None:
    config = BrokerConfig.from_mapping({"max_qos": 1, "endpoints": ["tcp:1884"]})
    assert config == BrokerConfig(max_qos=1, endpoints=["tcp:1884"])


def test_from_mapping_unknown_key() -> None:
    with pytest.raises(ConfigError) as caught:
        BrokerConfig.from_mapping({"max_qos": 1, "maxqos": 1})
    assert caught.value.key == "maxqos"
    assert str(caught.value) == "maxqos: unknown setting"


def test_from_mapping_source_is_named() -> None:
    with pytest.raises(ConfigError) as caught:
        BrokerConfig.from_mapping({"max_qos": 7}, "somewhere")
    assert str(caught.value) == "somewhere: max_qos: 7 is out of range (0..2)"
    assert (caught.value.source, caught.value.key) == ("somewhere", "max_qos")


def test_from_file(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('endpoints = ["tcp:1884", "ssl:8883"]\nmax_qos = 1\n'
                    'retain_available = false\nauto_id_prefix = "x-"\n')
    assert BrokerConfig.from_file(path) == BrokerConfig(
        endpoints=["tcp:1884", "ssl:8883"], max_qos=1, retain_available=False, auto_id_prefix="x-")
    assert BrokerConfig.from_file(str(path)) == BrokerConfig.from_file(path)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text("# nothing set\n")
    assert BrokerConfig.from_file(path) == BrokerConfig()


def test_unknown_key_in_file_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text("max_qos = 1\nmax_qoss = 2\n")
    with pytest.raises(ConfigError) as caught:
        BrokerConfig.from_file(path)
    assert str(caught.value) == f"{path}: max_qoss: unknown setting"
    assert (caught.value.source, caught.value.key) == (str(path), "max_qoss")


def test_table_in_file_is_an_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text("[broker]\nmax_qos = 1\n")
    with pytest.raises(ConfigError) as caught:
        BrokerConfig.from_file(path)
    assert str(caught.value) == f"{path}: broker: unknown setting"


@pytest.mark.parametrize("line,key,reason", [
    ("max_qos = 3", "max_qos", "3 is out of range (0..2)"),
    ("max_qos = true", "max_qos", "expected int, got True"),
    ("max_qos = 1.0", "max_qos", "expected int, got 1.0"),
    ('max_qos = "1"', "max_qos", "expected int, got '1'"),
    ('endpoints = "tcp:1883"', "endpoints", "expected list, got 'tcp:1883'"),
    ("endpoints = [1883]", "endpoints", "expected a list of strings, got [1883]"),
    ("retain_available = 1", "retain_available", "expected bool, got 1"),
    ("connect_timeout = nan", "connect_timeout", "expected a finite number, got nan"),
    ("retry_interval = inf", "retry_interval", "expected a finite number, got inf"),
    ('websocket_endpoints = "tcp:8083"', "websocket_endpoints", "expected list, got 'tcp:8083'"),
    ('websocket_paths = ["/", "mqtt"]', "websocket_paths", "'mqtt' is not a request path (/..., without a query)"),
    ('websocket_paths = ["/mqtt?x=1"]', "websocket_paths", "'/mqtt?x=1' is not a request path (/..., without a query)"),
    ('websocket_paths = [""]', "websocket_paths", "'' is not a request path (/..., without a query)"),
    ('websocket_trusted_proxies = ["10.0.0.1", "proxy.example"]', "websocket_trusted_proxies",
     "'proxy.example' is not an IP address or network"),
    ('websocket_trusted_proxies = ["10.0.0.0/33"]', "websocket_trusted_proxies",
     "'10.0.0.0/33' is not an IP address or network"),
    ('websocket_origins = ["app.example.com"]', "websocket_origins",
     "'app.example.com' is not an origin (scheme://host[:port], e.g. https://app.example.com)"),
    ('websocket_origins = ["https://app.example.com/"]', "websocket_origins",
     "'https://app.example.com/' is not an origin (scheme://host[:port], e.g. https://app.example.com)"),
    ('history_filters = ["a/#/b"]', "history_filters", "'a/#/b' is not a topic filter"),
    # (Nothing is published on these: the log stayed empty without a word.)
    ('history_filters = ["a/#", "$share/g/a/#"]', "history_filters",
     "'$share/g/a/#' names a shared subscription: give the filter itself"),
    ('history_filters = ["$replay/all/a/#"]', "history_filters",
     "'$replay/all/a/#' is how a SUBSCRIBE asks for the log: give the filter itself"),
    ('http_api_keys = ["secret"]', "http_api_keys", "entry 1 is not a hashed key (sha256:<64 hex "
     "digits>, optionally name:sha256:...); python -m mqtt_broker.admin.keys makes one"),
    (f'http_api_keys = ["sha256:{"0" * 64}", "sha256:abc"]', "http_api_keys", "entry 2 is not a hashed key "
     "(sha256:<64 hex digits>, optionally name:sha256:...); python -m mqtt_broker.admin.keys makes one"),
])
def test_bad_value_in_file_names_key_and_file(tmp_path: Path, line: str, key: str, reason: str) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError) as caught:
        BrokerConfig.from_file(path)
    assert str(caught.value) == f"{path}: {key}: {reason}"



def test_an_auto_id_prefix_too_long_to_send_is_refused() -> None:
    """An assigned client id is the prefix and 32 hex digits, sent in a string of at most 65535
    bytes: with a longer prefix, every MQTT 5 client without a client id lost its CONNACK."""
    assert BrokerConfig(auto_id_prefix="x" * 65503).auto_id_prefix
    with pytest.raises(ConfigError, match="auto_id_prefix: longer than 65503 bytes"):
        BrokerConfig(auto_id_prefix="x" * 65504)


def test_a_response_information_too_long_to_send_is_refused() -> None:
    """Response Information is a string of at most 65535 bytes: a longer one was accepted and
    then never sent, to any client that asked for it."""
    assert BrokerConfig(response_information="é" * 32767 + "{client_id}").response_information
    with pytest.raises(ConfigError, match="response_information: longer than 65535 bytes"):
        BrokerConfig(response_information="é" * 32768)

def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as caught:
        BrokerConfig.from_file(path)
    assert str(caught.value) == f"{path}: cannot read: No such file or directory"
    assert caught.value.key is None


def test_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        BrokerConfig.from_file(tmp_path)
    assert str(caught.value) == f"{tmp_path}: cannot read: Is a directory"


@pytest.mark.parametrize("text", ["max_qos = \n", "max_qos = 1\nmax_qos = 2\n", "endpoints = [\n", "= 1\n"])
def test_invalid_toml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        BrokerConfig.from_file(path)
    assert str(caught.value).startswith(f"{path}: not valid TOML: ")
    assert re.search(r"\(at (line \d+, column \d+|end of document)\)$", str(caught.value))  # says where


def test_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_bytes(b'auto_id_prefix = "\xff"\n')
    with pytest.raises(ConfigError) as caught:
        BrokerConfig.from_file(path)
    assert str(caught.value).startswith(f"{path}: not valid TOML: not UTF-8")



def test_file_with_a_byte_order_mark(tmp_path: Path) -> None:
    """Windows' Notepad starts a UTF-8 file with a byte order mark: the broker refused to start
    on it ("Invalid statement at line 1, column 1"), which no editor shows."""
    path = tmp_path / "broker.toml"
    path.write_bytes(b'\xef\xbb\xbfauto_id_prefix = "x-"\n')
    assert BrokerConfig.from_file(path).auto_id_prefix == "x-"

# Valid TOML, but tomllib raises ValueError (Python's limit on an integer's digits) and
# RecursionError (one call per level of nesting): both escaped from_file.
UNPARSABLE = ["max_packet_size = " + "9" * 5000 + "\n", "endpoints = " + "[" * 3000 + "]" * 3000 + "\n"]


@pytest.mark.parametrize("text", UNPARSABLE, ids=["integer-of-5000-digits", "arrays-nested-3000-deep"])
def test_toml_that_python_cannot_parse_names_the_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        BrokerConfig.from_file(path)
    assert str(caught.value).startswith(f"{path}: not valid TOML: ")


# --- replace ------------------------------------------------------------------------------

def test_replace() -> None:
    original = BrokerConfig(max_qos=1)
    changed = original.replace(max_qos=2, endpoints=["tcp:1884"], connect_timeout=4)
    assert changed == BrokerConfig(max_qos=2, endpoints=["tcp:1884"], connect_timeout=4.0)
    assert original == BrokerConfig(max_qos=1)
    assert original.replace() == original and original.replace() is not original


def test_replace_validates() -> None:
    with pytest.raises(ConfigError) as caught:
        BrokerConfig().replace(max_qos=3)
    assert str(caught.value) == "max_qos: 3 is out of range (0..2)"
    with pytest.raises(ConfigError) as caught:
        BrokerConfig().replace(max_qoss=1)
    assert str(caught.value) == "max_qoss: unknown setting"


def test_replace_does_not_share_lists() -> None:
    original = BrokerConfig(endpoints=["tcp:1883"])
    copy = original.replace(max_qos=1)
    copy.endpoints.append("tcp:1884")
    assert original.endpoints == ["tcp:1883"]


# --- the example file ---------------------------------------------------------------------

def test_example_file_sets_every_setting_to_the_default_of_twistd_mqttbroker() -> None:
    """It is the file a server runs with (examples/mqttbroker.service installs it): copied as it
    is, it must not change what twistd mqttbroker does, its store on disk included."""
    with open(EXAMPLE, "rb") as file:
        raw = tomllib.load(file)
    assert sorted(raw) == sorted(f.name for f in FIELDS)
    config = BrokerConfig.from_file(EXAMPLE)
    assert config == BrokerConfig(**TWISTD_DEFAULTS)
    assert config.persistence == "sqlite"
    options = Options()
    options.parseOptions(["--config", str(EXAMPLE)])
    assert options["broker_config"] == BrokerConfig(**TWISTD_DEFAULTS)
    for f in FIELDS:  # equal and of the same type: 10 would equal 10.0, true would equal 1
        assert type(raw[f.name]) is kind_of(f), f.name


def test_example_file_comments_are_the_help() -> None:
    """Each setting is preceded by its help text as a comment, in declaration order."""
    lines = EXAMPLE.read_text().splitlines()
    found: list[str] = []
    for number, line in enumerate(lines):
        if not line or line.startswith("#"):
            continue
        key = line.split("=", 1)[0].strip()
        comment: list[str] = []
        above = number - 1
        while above >= 0 and lines[above].startswith("#"):
            comment.insert(0, lines[above].lstrip("#").strip())
            above -= 1
        help_text = next(f.metadata["help"] for f in FIELDS if f.name == key)
        assert " ".join(comment) == help_text, key
        found.append(key)
    assert found == [f.name for f in FIELDS]


@pytest.mark.parametrize("key, good, bad", [
    ("persistence", ["memory", "sqlite"], ["disk", "SQLite", ""]),
    ("persistence_synchronous", ["normal", "full"], ["off", "FULL"]),
])
def test_settings_with_a_fixed_set_of_values(key: str, good: list[str], bad: list[str]) -> None:
    for value in good:
        assert getattr(BrokerConfig(**{key: value}), key) == value
    for value in bad:
        with pytest.raises(ConfigError, match=f"{key}: .* is not one of"):
            BrokerConfig(**{key: value})


def _options(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_float_setting_given_a_toml_integer_too_large_for_a_float_is_a_config_error(tmp_path: Path) -> None:
    # TOML integers have no bound in tomllib; a float setting converts them with float().
    path = tmp_path / "big.toml"
    path.write_text("connect_timeout = 1" + "0" * 400 + "\n")
    with pytest.raises(ConfigError, match="connect_timeout"):
        BrokerConfig.from_file(path)


def test_float_setting_given_a_toml_integer_too_large_on_the_command_line_path_is_a_usage_error(
        tmp_path: Path) -> None:
    path = tmp_path / "big.toml"
    path.write_text("sys_interval = 1" + "0" * 400 + "\n")
    with pytest.raises(usage.UsageError, match="sys_interval"):
        _options("--config", str(path))


def test_an_auto_id_prefix_that_is_not_utf8_is_a_usage_error() -> None:
    # A byte that is not UTF-8 in argv arrives as a lone surrogate (surrogateescape).
    with pytest.raises(usage.UsageError, match="--auto-id-prefix"):
        _options("--auto-id-prefix", "auto-\udcff")


def test_a_response_information_that_is_not_utf8_is_refused() -> None:
    # Accepted, it makes every MQTT 5 CONNECT asking for Response Information raise
    # UnicodeEncodeError in connect._connack_properties [MQTT-1.5.4-1].
    with pytest.raises(usage.UsageError, match="--response-information"):
        _options("--response-information", "response/\udcff")


def test_a_response_information_that_is_not_utf8_is_refused_when_embedding() -> None:
    from protocol_helpers import make_broker
    with pytest.raises(ConfigError, match="response_information"):
        make_broker(response_information="response/\udcff", sys_interval=0)


def test_a_cluster_password_holding_a_quote_is_not_told_in_an_error() -> None:
    # docs/security.md, docs/twistd.md: no password is ever logged; config.without_passwords:
    # "no password is logged, nor shown by the admin API, nor told in an error".
    with pytest.raises(ConfigError) as raised:
        BrokerConfig(cluster='redis://:pa"ss@127.0.0.1:notaport/0')
    assert 'pa"ss' not in str(raised.value), str(raised.value)


A_BRIDGE = ('connection = "b1"\naddresses = "127.0.0.1:1883"\ntopic = "a/# both 1"\n'
            'remote_username = "u"\nremote_password = "hunter2"\n')


@pytest.mark.parametrize("text,key,reason", [
    ("[bridge]\n" + A_BRIDGE, "bridge", "expected a list of [[bridge]] tables, got a dict"),
    ('bridge = [{connection = "b", addresses = "h", topic = "a", remote_username = "u", '
     'remote_password = "hunter2"}, "x"]\n',
     "bridge", "expected a list of [[bridge]] tables, entry 2 is a str"),
    ('cluster = ["redis://:hunter2@127.0.0.1:6379/0"]\n', "cluster", "expected str, got a list"),
    ('http_auth_url = ["https://broker:hunter2@auth.example/check"]\n', "http_auth_url", "expected str, got a list"),
], ids=["bridge-written-as-one-table", "bridge-list-with-a-string", "cluster-list", "http_auth_url-list"])
def test_a_setting_of_the_wrong_shape_does_not_tell_the_password_it_holds(
        tmp_path: Path, text: str, key: str, reason: str) -> None:
    # Told at start, in SIGHUP's warning and in POST /api/v1/config/reload's problems.
    path = tmp_path / "broker.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        BrokerConfig.from_file(path)
    assert str(raised.value) == f"{path}: {key}: {reason}"


@pytest.mark.parametrize("url", ["redis://:secret@127.0.0.1:6379/0",
                                 "redis+sentinel://127.0.0.1:26379/mymaster/0"])
def test_cluster_tls_ca_file_without_a_rediss_url_is_refused(url: str) -> None:
    # Taken, it would promise TLS while the node talks to Redis (its password too) in clear text.
    with pytest.raises(ConfigError, match="cluster_tls_ca_file.*rediss://"):
        BrokerConfig(cluster=url, cluster_tls_ca_file="ca.pem")
    assert BrokerConfig(cluster="rediss://127.0.0.1:6379/0", cluster_tls_ca_file="ca.pem").cluster_tls_ca_file


def test_a_cluster_password_holding_a_quote_is_not_shown_by_the_admin_api() -> None:
    import dataclasses

    from mqtt_broker.admin.shapes import redacted  # what GET /api/v1/config answers
    for password in ("pa'ss", 'pa"ss'):
        config = BrokerConfig(cluster=f"redis://:{password}@127.0.0.1:6379/0")
        shown = redacted(dataclasses.asdict(config))["cluster"]
        assert password not in shown, shown


def test_sighup_reading_a_float_setting_given_a_huge_integer_reports_a_problem(tmp_path: Path) -> None:
    # What SIGHUP runs (tap.reload -> BrokerService.reload -> tap._config_problems): a file that
    # cannot be read now is to be named as a problem, not raise out of the reload.
    from twisted.internet.testing import MemoryReactorClock

    from mqtt_broker import BrokerService
    from mqtt_broker.tap import _config_problems
    path = tmp_path / "broker.toml"
    path.write_text('endpoints = ["tcp:0:interface=127.0.0.1"]\npersistence = "memory"\n')
    options = _options("--config", str(path))
    service = BrokerService(config=options["broker_config"], reactor=MemoryReactorClock())
    path.write_text('endpoints = ["tcp:0:interface=127.0.0.1"]\npersistence = "memory"\n'
                    "hook_timeout = 1" + "0" * 400 + "\n")
    problems = _config_problems(service, options)
    assert problems and "hook_timeout" in problems[0], problems


@pytest.mark.parametrize("text", UNPARSABLE, ids=["integer-of-5000-digits", "arrays-nested-3000-deep"])
def test_sighup_reading_toml_that_python_cannot_parse_reports_a_problem(tmp_path: Path, text: str) -> None:
    from twisted.internet.testing import MemoryReactorClock

    from mqtt_broker import BrokerService
    from mqtt_broker.tap import _config_problems
    path = tmp_path / "broker.toml"
    path.write_text('endpoints = ["tcp:0:interface=127.0.0.1"]\npersistence = "memory"\n')
    options = _options("--config", str(path))
    service = BrokerService(config=options["broker_config"], reactor=MemoryReactorClock())
    path.write_text(text)
    problems = _config_problems(service, options)
    assert problems and f"{path}: not valid TOML: " in problems[0], problems

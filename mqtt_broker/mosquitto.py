"""A ``mosquitto.conf`` read as this broker's settings: ``mqttbroker-config from-mosquitto FILE``
writes the equivalent TOML, ``twistd mqttbroker --mosquitto-config FILE`` runs with it.

What maps is converted (listeners to endpoint strings, authentication, limits, persistence,
bridges); what has no equivalent here (per-listener authentication, logging options that are
twistd's) is named with its file and line, never dropped in silence; what would leave the broker
more open than Mosquitto without it (plugins, which may check logins and topics) is refused.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import json
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from functools import cmp_to_key
from pathlib import Path
from typing import Any, Iterator

# Mosquitto setting -> (our setting, kind). Durations and sizes are converted by kind.
_GLOBAL: dict[str, tuple[str, str]] = {
    "allow_anonymous": ("allow_anonymous", "bool"),
    "password_file": ("password_file", "path"),
    "acl_file": ("acl_file", "path"),
    "max_inflight_messages": ("max_inflight_messages", "int"),
    "max_queued_messages": ("max_queued_messages", "int"),
    "max_queued_bytes": ("max_queued_bytes", "int"),
    "max_packet_size": ("max_packet_size", "int"),
    "max_keepalive": ("max_keepalive", "int"),
    "max_connections": ("max_connections", "int"),
    "max_qos": ("max_qos", "int"),
    "max_topic_alias": ("max_topic_alias", "int"),
    "sys_interval": ("sys_interval", "atoi"),
    "retain_available": ("retain_available", "bool"),
    "allow_zero_length_clientid": ("allow_zero_length_clientid", "bool"),
    "auto_id_prefix": ("auto_id_prefix", "str"),
    "persistent_client_expiration": ("persistent_client_expiration", "duration"),
    "queue_qos0_messages": ("queue_qos0_messages", "bool"),
    "set_tcp_nodelay": ("set_tcp_nodelay", "bool"),
    "connection_messages": ("connection_messages", "bool"),
    "use_identity_as_username": ("use_identity_as_username", "bool"),
    "require_certificate": ("require_certificate", "bool"),
}
_LISTENER = {"certfile", "keyfile", "cafile", "protocol", "socket_domain", "bind_address", "bind_interface",
             "require_certificate", "use_identity_as_username", "max_connections", "mount_point",
             "tls_version", "ciphers", "ciphers_tls1.3", "http_dir", "use_subject_as_username",
             "use_username_as_clientid", "capath", "crlfile", "dhparamfile", "psk_hint", "websockets_log_level",
             "websockets_headers_size", "allow_anonymous", "password_file", "acl_file", "max_qos",
             "max_topic_alias"}
_BRIDGE = {"address", "addresses", "topic", "remote_clientid", "local_clientid", "remote_username",
           "remote_password", "cleansession", "bridge_protocol_version", "keepalive_interval",
           "restart_timeout", "bridge_cafile", "bridge_certfile", "bridge_keyfile", "bridge_insecure",
           "try_private", "notifications", "notification_topic", "notifications_local_only",
           "bridge_outgoing_retain", "bridge_max_packet_size", "bridge_attempt_unsubscribe", "clientid", "username",
           "password"}
_BRIDGE_RENAMED = {"address": "addresses", "clientid": "remote_clientid", "username": "remote_username",
                   "password": "remote_password"}
_BRIDGE_ONCE = {"addresses", "remote_clientid", "local_clientid", "remote_username", "remote_password",
                "notification_topic", "bridge_cafile", "bridge_certfile", "bridge_keyfile"}
"""Bridge settings Mosquitto refuses to start with twice in a connection (a second address line
among them), here by their names in a [[bridge]] table."""
_BRIDGE_BOOLS = {"cleansession", "bridge_insecure", "try_private", "notifications", "notifications_local_only",
                 "bridge_outgoing_retain", "bridge_attempt_unsubscribe"}
# Settings whose job twistd does, or that only tune Mosquitto's own workings.
_TWISTD = {"pid_file": "twistd --pidfile", "user": "twistd --uid/--gid", "log_dest": "twistd --logfile/--syslog",
           "log_type": "twistd's logging", "log_timestamp": "twistd's logging",
           "log_timestamp_format": "twistd's logging", "log_facility": "twistd --syslog",
           "websockets_log_level": "twistd's logging"}
_ONCE = {"password_file", "acl_file", "persistence_location", "persistence_file", "pid_file", "user", "bind_address",
         "certfile", "keyfile", "cafile", "capath", "ciphers", "crlfile", "dhparamfile", "psk_file", "auto_id_prefix"}
"""Settings Mosquitto 2 refuses to start with twice ("Duplicate ... value in configuration"): for
the whole file, or for each listener (the TLS files; with per_listener_settings, the security ones
and psk_file)."""
_ONCE_PER_LISTENER = {"certfile", "keyfile", "cafile", "capath", "ciphers", "crlfile", "dhparamfile"}
_PER_LISTENER: dict[str, Any] = {"use_identity_as_username": False, "max_connections": -1, "max_qos": 2,
                                 "max_topic_alias": 10}
"""Per-listener settings of Mosquitto that are global here, with Mosquitto's defaults."""
_SECURITY: dict[str, Any] = {"allow_anonymous": False, "password_file": None, "acl_file": None,
                             "allow_zero_length_clientid": True, "auto_id_prefix": "auto-"}
"""Mosquitto's security settings (per listener with per_listener_settings, global here), with
Mosquitto 2's defaults for a listener that does not set them."""
_PLUGIN = ("Mosquitto plugins do not load here, and what it checks (logins, topics: dynamic security, say) "
           "would not be checked; remove the line to accept that, and do its checks with the authenticators "
           "(docs/security.md) or hooks (docs/embedding.md)")
_REFUSED = {
    "bind_interface": "give bind_address with the interface's address instead (a listener for each address)",
    "mount_point": "the listener's clients would not be kept under their own topic prefix; remove it to accept "
                   "that, or run a broker of their own for them",
    "use_username_as_clientid": "clients would keep the client ids they give, and the ACL's %c patterns would "
                                "name those: a client could take another's topics",
    "psk_hint": "the listener would let in clients without the key, over plain TCP (TLS-PSK is not supported); give "
                "it certfile and keyfile instead",
    "crlfile": "clients with revoked certificates would be let in (certificate revocation lists are not checked)",
    "clientid_prefixes": "clients with any client id would be let in; check client ids in a connect hook instead "
                         "(docs/embedding.md)",
    "check_retain_source": "a retained message would still be sent after its publisher lost the right to write its "
                           "topic (the ACL is not checked again at delivery)",
    "plugin": _PLUGIN, "auth_plugin": _PLUGIN, "global_plugin": _PLUGIN,
}
"""Settings without an equivalent here whose loss would open the broker more than Mosquitto does:
refused, not noted (the booleans of _REFUSED_IF_TRUE only when true, their default being this
broker's way)."""
_REFUSED_IF_TRUE = {"use_username_as_clientid", "check_retain_source"}
_MAKE_DEFAULT_LISTENER: dict[str, Any] = {
    "protocol": "mqtt", "socket_domain": None, "certfile": None, "keyfile": None, "cafile": None, "capath": None,
    "ciphers": None, "ciphers_tls1.3": None, "dhparamfile": None, "max_connections": -1, "max_qos": 2,
    "use_identity_as_username": False, "use_subject_as_username": False, "require_certificate": False}
"""Listener settings that, before any listener line, make Mosquitto open its default listener (port
1883, or ``port``'s, on every interface, or ``bind_address``'s), unless given their default here."""
_MOSQUITTO_KEYS = frozenset({
    "acl_file", "address", "addresses", "allow_anonymous", "allow_duplicate_messages", "allow_zero_length_clientid",
    "auth_plugin", "auth_plugin_deny_special_chars", "auto_id_prefix", "autosave_interval", "autosave_on_changes",
    "bind_address", "bind_interface", "bridge_alpn", "bridge_attempt_unsubscribe", "bridge_bind_address",
    "bridge_cafile", "bridge_capath", "bridge_certfile", "bridge_identity", "bridge_insecure", "bridge_keyfile",
    "bridge_max_packet_size", "bridge_outgoing_retain", "bridge_protocol_version", "bridge_psk",
    "bridge_require_ocsp", "bridge_tls_version", "cafile", "capath", "certfile", "check_retain_source", "ciphers",
    "ciphers_tls1.3", "cleansession", "clientid", "clientid_prefixes", "connection", "connection_messages",
    "crlfile", "dhparamfile", "global_plugin", "http_dir", "idle_timeout", "include_dir", "keepalive_interval",
    "keyfile", "listener", "local_cleansession", "local_clientid", "local_password", "local_username", "log_dest",
    "log_facility", "log_timestamp", "log_timestamp_format", "log_type", "max_connections", "max_inflight_bytes",
    "max_inflight_messages", "max_keepalive", "max_packet_size", "max_qos", "max_queued_bytes",
    "max_queued_messages", "max_topic_alias", "maximum_qos", "memory_limit", "message_size_limit", "mount_point",
    "notification_topic", "notifications", "notifications_local_only", "password", "password_file",
    "per_listener_settings", "persistence", "persistence_file", "persistence_location",
    "persistent_client_expiration", "pid_file", "plugin", "port", "protocol", "psk_file", "psk_hint",
    "queue_qos0_messages", "remote_clientid", "remote_password", "remote_username", "require_certificate",
    "restart_timeout", "retain_available", "retained_persistence", "retry_interval", "round_robin",
    "set_tcp_nodelay", "socket_domain", "start_type", "sys_interval", "threshold", "tls_engine",
    "tls_engine_kpass_sha1", "tls_keyform", "tls_version", "topic", "try_private", "upgrade_outgoing_qos",
    "use_identity_as_username", "use_subject_as_username", "use_username_as_clientid", "user", "username",
    "websockets_headers_size", "websockets_log_level"})
"""The settings Mosquitto 2.0.11 reads (and ``plugin_opt_*``, ``auth_opt_*``): it refuses to start
with any other ("Unknown configuration variable"). One close to them is taken for a misspelling
and refused (an ``acl_flie``, noted and dropped, would leave the broker without its ACL); another
is noted, as other releases of Mosquitto know keys this one does not (``store_clean_interval``,
say, or ``global_plugin``, which is refused as the other plugins are)."""
_MOST_PACKET_SIZE = 268_435_460
"""Mosquitto's packet size limit when none is set: the most MQTT allows (header included)."""
_RANGES: dict[str, tuple[int, int | None]] = {"max_keepalive": (10, 65535), "max_packet_size": (20, None)}
"""Values Mosquitto 2 refuses to start with outside these bounds."""
_QUEUED = 1000
"""Mosquitto's max_queued_messages when none is set (this broker's too)."""
_MAX_INFLIGHT = 65535
"""The most max_inflight_messages can be here: as many as there are packet identifiers."""
_HANDLED_HERE = {"autosave_interval", "autosave_on_changes", "persistence_file"}
_NO_LIMIT_HERE = {"memory_limit": "no memory limit here: bound what sessions hold with max_queued_messages and "
                                  "max_queued_bytes",
                  "max_inflight_bytes": "no byte limit on messages in flight here: max_inflight_messages bounds them"}


@dataclass
class Note:
    """A line that is not carried over, or not as it was (``carried``), and why. Shown, a line not
    carried over is named by its key alone: its value may be a password (``local_password``, a
    plugin's ``plugin_opt_*``, a key of another release), and the notes are printed at every start
    with ``--mosquitto-config``."""

    source: str
    line: int
    text: str
    why: str
    carried: bool = False

    def __str__(self) -> str:
        shown = self.text if self.carried else self.text.split(maxsplit=1)[0]
        return f"{self.source}:{self.line}: {shown!r}{'' if self.carried else ' not carried over'}: {self.why}"


@dataclass
class Conversion:
    settings: dict[str, Any] = field(default_factory=dict)
    bridges: list[dict[str, Any]] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    lines: dict[str, str] = field(default_factory=dict)
    """Setting (``bridge[1].topic`` for a bridge's) -> "file:line" of the line that gave it last."""

    def config(self) -> Any:
        """The settings as a :class:`~mqtt_broker.config.BrokerConfig` (raises ConfigError, which
        names the file and line of the setting it refuses)."""
        from .config import BrokerConfig, ConfigError
        try:
            return BrokerConfig.from_mapping({**self.settings, "bridge": self.bridges} if self.bridges else self.settings)
        except ConfigError as e:
            where = self.lines.get(e.key or "")
            if where is None:
                raise
            raise ConfigError(e.reason, e.key, where) from None

    def toml(self, source: str = "") -> str:
        lines = [f"# Converted from {source} by mqttbroker-config from-mosquitto." if source else
                 "# Converted by mqttbroker-config from-mosquitto."]
        if self.notes:
            lines.append("# Not carried over:")
            lines += [f"#   {note}" for note in self.notes]
        lines.append("")
        lines += [f"{key} = {_toml(value)}" for key, value in self.settings.items()]
        for bridge in self.bridges:
            lines += ["", "[[bridge]]"] + [f"{key} = {_toml(value)}" for key, value in bridge.items()]
        return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # A TOML basic string is a JSON one of scalar values (no surrogate pairs) and DEL escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    return "[" + ", ".join(_toml(v) for v in value) + "]"


class _Listener:
    def __init__(self, port: int, bind: str, source: str, line: int) -> None:
        self.port, self.bind, self.source, self.line = port, bind, source, line
        self.options: dict[str, str] = {}
        self.security: dict[str, str] = {}
        """Its allow_anonymous, password_file and acl_file (global settings here)."""
        self.limits: dict[str, tuple[Any, str, int, str]] = {}
        """Its settings of _PER_LISTENER (global here): (value, source, line, text)."""
        self.by_subject = False
        """It has use_subject_as_username true."""

    @property
    def tls(self) -> bool:
        """Whether it speaks TLS: certfile and keyfile (one alone, Mosquitto listens without)."""
        return "certfile" in self.options and "keyfile" in self.options

    @property
    def address(self) -> str:
        """The address it listens on ("": every IPv4 one)."""
        return self.bind or ("::" if self.options.get("socket_domain") == "ipv6" else "")

    def endpoint(self) -> tuple[str, str]:
        """("mqtt" or "websockets", endpoint string)."""
        o = self.options
        if self.port == 0:  # (a Unix socket's path, any: Mosquitto refuses port 0 without one)
            # (Mosquitto speaks TLS there, and refuses WebSocket: neither is done here)
            if "certfile" in o or "keyfile" in o or "cafile" in o or o.get("protocol", "mqtt") != "mqtt":
                raise ValueError(f"{self.source}:{self.line}: a Unix socket listener takes neither TLS nor "
                                 f"WebSocket here")
            return "mqtt", f"unix:{_escape(self.bind)}:mode=770"  # (Mosquitto's: not every local user's)
        interface = f":interface={_escape(self.address)}" if self.address else ""
        if "certfile" in o and "keyfile" in o:  # (one alone: Mosquitto listens without TLS, as here)
            tls = f":privateKey={_escape(o.get('keyfile', ''))}:certKey={_escape(o.get('certfile', ''))}"
            if "cafile" not in o and o.get("require_certificate") == "true":
                # Without the CA, the listener could not ask for a client certificate: refused
                # rather than converted to a listener that lets in clients without one.
                raise ValueError(f"{self.source}:{self.line}: require_certificate needs cafile here (capath is "
                                 f"not supported)")
            if "cafile" in o and o.get("require_certificate") == "true":
                description = f"mqtts:{self.port}{interface}{tls}:caCerts={_escape(o['cafile'])}:requireCertificate=yes"
            else:  # (Mosquitto asks for no client certificate without require_certificate, cafile or not)
                description = f"ssl:{self.port}{interface}{tls}"
        else:
            description = f"tcp:{self.port}{interface}"
        return o.get("protocol", "mqtt"), description


def _one_listener_per_port(listeners: list[_Listener]) -> None:
    """Refuse two listeners this broker could not both open: one port, on addresses that meet
    (an IPv6 socket on :: takes IPv4 clients too, where Mosquitto's takes IPv6 ones only)."""
    taken: dict[int, list[tuple[tuple[int, bool, str], _Listener]]] = {}
    for listener in listeners:
        if listener.port == 0:  # (a Unix socket)
            continue
        one = _family_of(listener.address)
        for other_address, other in taken.get(listener.port, []):
            if _meet(one, other_address):
                dual = " (:: takes IPv4 clients too here)" if (6, True, "::") in (one, other_address) else ""
                raise ValueError(f"{listener.source}:{listener.line}: listener {listener.port} takes the port of "
                                 f"the listener of {other.source}:{other.line}{dual}: give them addresses of their own")
        taken.setdefault(listener.port, []).append((one, listener))


def _family_of(address: str) -> tuple[int, bool, str]:
    """(IP version, every address of it, the address in one spelling) of a listener's address
    ("": every IPv4 one; a host name: as it is, taken for IPv4)."""
    try:
        ip = ipaddress.ip_address(address or "0.0.0.0")
    except ValueError:
        return 4, False, address
    return ip.version, ip.is_unspecified, str(ip)


def _meet(one: tuple[int, bool, str], other: tuple[int, bool, str]) -> bool:
    """Whether two addresses cannot both be listened on, one port: the same, a wildcard and an
    address of its version, or the IPv6 wildcard (which takes IPv4 clients too) and any."""
    return one[2] == other[2] or (one[0] == 6 and one[1]) or (other[0] == 6 and other[1]) or (
        one[0] == other[0] and (one[1] or other[1]))


def _ipv6_loopback() -> bool:
    """Whether ::1 can be listened on here: Mosquitto's local-only mode opens it where it can,
    and a broker would not start on it without (a container without IPv6, say)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def _lines(path: Path, seen: set[Path], top: bool = True) -> Iterator[tuple[str, int, str, list[str]]]:
    """(source, line number, text, words) of every setting line, the files of the main file's
    include_dir lines in place after their line (Mosquitto follows none in an included file)."""
    path = path.resolve()
    if path in seen:
        return
    seen.add(path)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip() or raw.lstrip().startswith(b"#"):
                continue  # (a comment in any encoding, as Mosquitto reads bytes)
            try:
                text = raw.decode().strip()
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{number}: not UTF-8 (byte {e.start + 1})") from None
            words = text.split()
            if words[0] == "include_dir" and len(words) > 1:
                yield str(path), number, text, words  # (for what differs from Mosquitto: see read)
                if not top:
                    continue
                directory = Path(text.split(None, 1)[1])
                if not directory.is_absolute():
                    directory = path.parent / directory
                try:
                    names = [name for name in os.listdir(directory) if len(name) > 5 and name.endswith(".conf")]
                except OSError as e:
                    raise ValueError(f"{path}:{number}: unable to open include_dir {str(directory)!r}: "
                                     f"{e.strerror}") from None
                for name in sorted(names, key=cmp_to_key(_mosquitto_compare)):
                    try:
                        yield from _lines(directory / name, seen, False)
                    except OSError as e:
                        raise ValueError(f"{path}:{number}: include_dir: cannot read {str(directory / name)!r}: "
                                         f"{e.strerror or e}") from None
                continue
            yield str(path), number, text, words


def _mosquitto_compare(first: str, second: str) -> int:
    """Mosquitto's sort of include_dir files: each character compared in upper case, then as it
    is (so "a.conf" < "B.conf" < "b.conf" < "_.conf"), a C char being signed; glibc's toupper of
    a negative char is its unsigned value (so "z.conf" < "é.conf"); a name that ends first is
    compared by its NUL with the other's signed char ("x.confé.conf" < "x.conf")."""
    one, two = first.encode(), second.encode()
    for a, b in zip(one, two):
        upper_a, upper_b = a - 32 if 97 <= a <= 122 else a, b - 32 if 97 <= b <= 122 else b
        if upper_a != upper_b:
            return upper_a - upper_b
        if a != b:
            return (a - 256 if a > 127 else a) - (b - 256 if b > 127 else b)
    rest_a = one[len(two)] if len(one) > len(two) else 0
    rest_b = two[len(one)] if len(two) > len(one) else 0
    return (rest_a - 256 if rest_a > 127 else rest_a) - (rest_b - 256 if rest_b > 127 else rest_b)


class _Converter:
    """One conversion, read a line at a time: a method per family of directives takes the lines
    that are its own, finish() does what needs every line."""

    def __init__(self, main_file: str) -> None:
        self.main_file = main_file
        self.out = Conversion()
        self.listeners: list[_Listener] = []
        self.current: _Listener | None = None
        """The listener of the last listener line of the file being read (None: Mosquitto's
        default listener, as at the start of each file)."""
        self.default_port: _Listener | None = None
        self.opened_by: tuple[str, int, str] | None = None
        """The listener setting that opened Mosquitto's default listener, and its line."""
        self.local_only = True
        """No listener, port or bind_address line was read: Mosquitto 2 stays in its local-only
        mode, where it lets anonymous clients in whatever allow_anonymous says (but for the default
        listener's own, with per_listener_settings)."""
        self.anonymous: tuple[str, int, str] | None = None
        """The last allow_anonymous line."""
        self.bridge: dict[str, Any] | None = None
        """The table of the last connection line of the file being read."""
        self.moved: set[str] = set()
        """The sections ("listener", "connection") of the file being read that a file it included
        followed with one of its own (see ``convert``)."""
        self.default_topic_alias: tuple[int, str, int, str] | None = None
        """max_topic_alias before any listener line, and its line: the default listener's, not
        opened for it."""
        self.capaths: list[tuple[dict[str, Any], str, int, str]] = []
        self.insecure: list[tuple[dict[str, Any], str, int, str]] = []
        self.per_listener = False
        self.security_seen = False
        self.before_listeners: list[tuple[str, Any, str, int, str]] = []
        """With per_listener_settings, the security lines before the first listener: (key, value,
        source, line, text), the default listener's in Mosquitto."""
        self.persistence: tuple[str, int, str] | None = None
        """The persistence true line, if the last one is."""
        self.location = ""
        self.identity_by_cn = False
        """A use_identity_as_username true was read (the common name names clients)."""
        self.identities: list[tuple[_Listener, bool, bool]] = []
        """(listener, value, by subject) of each use_identity_as_username (or
        use_subject_as_username true) line, in the order read."""
        self.queue_lines: dict[str, tuple[str, int, str]] = {}
        """The max_queued_messages and max_queued_bytes lines (source, line, text)."""
        self.message_size_limit: tuple[int, str, int, str] | None = None
        self.given: set[tuple[int, str]] = set()
        """(listener, key) of the settings of _ONCE read so far (listener -1: the whole file's)."""

    def read(self, source: str, number: int, text: str, key: str) -> None:
        near = [] if key in _MOSQUITTO_KEYS else difflib.get_close_matches(key, _MOSQUITTO_KEYS, 1, 0.8)
        if near and not key.startswith(("plugin_opt_", "auth_opt_")):
            raise ValueError(f"{source}:{number}: {key} is no setting of Mosquitto's, which refuses to start so: "
                             f"{near[0]}?")
        value = text[len(key):].strip()
        if key == "include_dir":  # (its files are read in place, those of the main file's)
            if source != self.main_file:
                self._note(source, number, text, "Mosquitto follows include_dir in its main file only")
            elif not Path(value).is_absolute():
                self.out.notes.append(Note(source, number, text, "a relative path: Mosquitto opens it from the "
                                           "directory it runs in, this conversion from the file's", carried=True))
            return
        if key == "connection":
            self.out.lines[f"bridge[{len(self.out.bridges) + 1}].connection"] = f"{source}:{number}"
        elif self.bridge is not None and key in _BRIDGE:
            self.out.lines[f"bridge[{len(self.out.bridges)}].{_BRIDGE_RENAMED.get(key, key)}"] = f"{source}:{number}"
        else:
            ours = _GLOBAL[key][0] if key in _GLOBAL else {"message_size_limit": "max_packet_size",
                                                           "persistence_location": "data_dir"}.get(key)
            if ours is not None:
                self.out.lines[ours] = f"{source}:{number}"
        if key in _ONCE:
            per_listener = key in _ONCE_PER_LISTENER or (self.per_listener and (key in _SECURITY or key == "psk_file"))
            scope = (id(self.current) if per_listener else -1, key)
            if scope in self.given:
                raise ValueError(f"{source}:{number}: {key} is given twice; Mosquitto refuses to start so")
            self.given.add(scope)
        # The first family to take the line has it, which settles the keys two of them know:
        # allow_anonymous, password_file and acl_file are security's, not a listener's; max_qos and the
        # like after a listener line are that listener's, not the global settings of those names.
        for family in (self._bridge_line, self._security_line, self._listener_line, self._persistence_line,
                       self._one_to_one_line):
            if family(source, number, text, key, value):
                return
        self._unsupported_line(source, number, text, key, value)

    def _topic_line(self, source: str, number: int, text: str, value: str) -> str:
        """A bridge's topic line as Mosquitto reads it: up to a comment after the direction (the
        pattern may be "#"), the QoS by C's atoi, a local prefix without a remote one, and no
        more than five words."""
        from .bridge.config import BridgeTopic
        words = value.split()
        words = words[:2] + _words(" ".join(words[2:]))
        if len(words) > 2 and not (words[2].isascii() and words[2].isdigit()):
            qos = _value("atoi", words[2], source, number)
            self.out.notes.append(Note(source, number, text, f"QoS {words[2]!r} is read as {qos}, as Mosquitto "
                                       "reads it (C's atoi)", carried=True))
            words[2] = str(qos)
        if len(words) == 4:
            words.append('""')
        elif len(words) > 5:
            self.out.notes.append(Note(source, number, text, "the words after the fifth are left out, as Mosquitto "
                                       "does", carried=True))
            words = words[:5]
        value = " ".join(words)
        try:
            BridgeTopic.parse(value)
        except ValueError as e:
            raise ValueError(f"{source}:{number}: {e}") from None
        return value

    def _not_moved(self, section: str, source: str, number: int, key: str) -> None:
        if section in self.moved:
            raise ValueError(f"{source}:{number}: {key} of a {section} section an include_dir came between (with a "
                             f"{section} of its own): Mosquitto's reading of it is undefined; move the line before "
                             f"the include_dir")

    def _note(self, source: str, number: int, text: str, why: str) -> None:
        self.out.notes.append(Note(source, number, text, why))

    def _note_dual_stack(self, source: str, number: int, text: str) -> None:
        """Name a listener on the IPv6 wildcard address: Mosquitto's socket there is IPv6 only
        (IPV6_V6ONLY), where this broker's takes IPv4 clients too."""
        self.out.notes.append(Note(source, number, text, "listening on :: here: IPv6 clients, and IPv4 ones where "
                                   "the system maps them (Linux's default); Mosquitto's takes IPv6 ones only",
                                   carried=True))

    def _bridge_line(self, source: str, number: int, text: str, key: str, value: str) -> bool:
        if key == "connection":
            self.bridge = {"connection": value}
            self.out.bridges.append(self.bridge)
            self.moved.discard("connection")
        elif (bridge := self.bridge) is None:
            if key in _BRIDGE:  # (each file starts outside any connection section)
                raise ValueError(f"{source}:{number}: {key} outside a connection section, which Mosquitto refuses")
            return False
        elif key in _BRIDGE:
            self._not_moved("connection", source, number, key)
            name = _BRIDGE_RENAMED.get(key, key)
            if name in _BRIDGE_ONCE and name in bridge:
                raise ValueError(f"{source}:{number}: {key} is given twice for connection {bridge['connection']}; "
                                 f"Mosquitto refuses to start so")
            if name == "addresses":
                bridge.setdefault("addresses", []).extend(
                    _bridge_address(address, source, number) for address in _words(value.replace(",", " ")))
            elif name == "topic":
                bridge.setdefault("topic", []).append(self._topic_line(source, number, text, value))
            elif name in _BRIDGE_BOOLS:
                bridge[name] = _bool(value, source, number)
                if name == "bridge_insecure" and bridge[name]:
                    self.insecure.append((bridge, source, number, text))  # (left out below without TLS)
            elif name in ("keepalive_interval", "bridge_max_packet_size"):
                bridge[name] = _value("int", value, source, number)
                if name == "keepalive_interval" and bridge[name] < 5:
                    bridge[name] = 5
                    self.out.notes.append(Note(source, number, text, "5 seconds, the least Mosquitto takes",
                                               carried=True))
            elif name == "restart_timeout":
                numbers = [_value("float", n, source, number) for n in value.split()]
                if len(numbers) not in (1, 2):
                    raise ValueError(f"{source}:{number}: restart_timeout takes one or two numbers of seconds")
                if min(numbers) < 1:
                    numbers = [max(n, 1.0) for n in numbers]
                    self.out.notes.append(Note(source, number, text, "1 second at least, as Mosquitto takes it",
                                               carried=True))
                bridge[name] = numbers if len(numbers) == 2 else numbers[0]
            else:
                bridge[name] = value
        elif key in ("bridge_identity", "bridge_psk"):
            # Noting it would leave a bridge without TLS, its CONNECT (password too) in clear.
            raise ValueError(f"{source}:{number}: {key}: TLS-PSK is not supported here: give bridge_cafile with the "
                             f"remote's CA certificates (and bridge_certfile/bridge_keyfile) instead")
        elif key == "bridge_capath":
            self.capaths.append((bridge, source, number, text))  # refused below unless the bridge has bridge_cafile
        elif key == "start_type" and _first(value) == "manual":
            raise ValueError(f"{source}:{number}: start_type manual is not supported, as Mosquitto says")
        elif key.startswith("bridge_") or key in ("start_type", "round_robin", "idle_timeout", "threshold",
                                                  "local_username", "local_password", "local_cleansession"):
            self._note(source, number, text, "this bridge setting has no equivalent here")
        else:
            return False
        return True

    def _security_line(self, source: str, number: int, text: str, key: str, value: str) -> bool:
        if key in _SECURITY:
            if key == "auto_id_prefix" and not value:
                raise ValueError(f"{source}:{number}: auto_id_prefix may not be empty, as Mosquitto says")
            ours, kind = _GLOBAL[key]
            converted = _setting(kind, value, source, number)
            if kind == "path" and not Path(value).is_absolute():
                self.out.notes.append(Note(source, number, text, f"a relative path: Mosquitto opens it from the "
                                           f"directory it runs in, this broker {converted}", carried=True))
            self.security_seen = True
            if key == "allow_anonymous":
                self.anonymous = (source, number, text)
            if not self.per_listener:
                self.out.settings[ours] = converted
            elif self.current is not None:
                self._not_moved("listener", source, number, key)
                self.current.security[key] = converted
            else:
                self.before_listeners.append((key, converted, source, number, text))
        elif key == "per_listener_settings":
            self.per_listener = _bool(value, source, number)
            if self.per_listener and self.security_seen:
                # Mosquitto refuses it too: the lines before it were read as global ones.
                raise ValueError(f"{source}:{number}: per_listener_settings must come before "
                                 f"{', '.join(_SECURITY)}")
            if self.per_listener:
                self._note(source, number, text, "authentication and ACLs apply to every listener alike here")
        else:
            return False
        return True

    def _listener_line(self, source: str, number: int, text: str, key: str, value: str) -> bool:
        given = key
        if key == "use_subject_as_username":
            key, value = self._subject_as_username(source, number, text, value)
        if key in ("listener", "port", "bind_address"):
            self.local_only = False
        if key == "listener":
            args = _words(value)
            if not args or not args[0].isdigit():
                raise ValueError(f"{source}:{number}: listener needs a port")
            if int(args[0]) > 65535:
                raise ValueError(f"{source}:{number}: invalid port {args[0]}, as Mosquitto says")
            if int(args[0]) == 0 and len(args) < 2:
                raise ValueError(f"{source}:{number}: a listener on port 0 needs a Unix socket path, as Mosquitto says")
            self.current = _Listener(int(args[0]), args[1] if len(args) > 1 else "", source, number)
            if self.current.port and _family_of(self.current.bind)[:2] == (6, True):
                self._note_dual_stack(source, number, text)
            self.moved.discard("listener")
            self.listeners.append(self.current)  # (a connection's section goes on, as in Mosquitto)
        elif key in ("port", "bind_address"):
            # The default listener's, wherever the line is (as in Mosquitto).
            if self.default_port is None:
                self.default_port = _Listener(1883, "", source, number)
            if key == "port":
                port = _value("int", value, source, number)
                if not 0 < port < 65536:
                    raise ValueError(f"{source}:{number}: port {port} is no port, as Mosquitto says")
                self.default_port.port = port  # keeps what was given before it
            else:
                self.default_port.bind = value
                if _family_of(value)[:2] == (6, True):
                    self._note_dual_stack(source, number, text)
        elif key in _REFUSED:
            if key not in _REFUSED_IF_TRUE or _bool(value, source, number):
                raise ValueError(f"{source}:{number}: {key} is not supported here: {_REFUSED[key]}")
        elif key == "max_topic_alias" and self.current is None:
            # The default listener's, which it does not open: the listeners of listener lines
            # keep Mosquitto's default (10).
            self.default_topic_alias = (_value("int", value, source, number), source, number, text)
        elif key in _LISTENER and (self.current is not None or _opens_default_listener(key, value)):
            target = self.current if self.current is not None else self.default_port
            if self.current is not None:
                self._not_moved("listener", source, number, key)
            if target is None:
                self.default_port = target = _Listener(1883, "", source, number)
                self.opened_by = (source, number, text)
            if key == "require_certificate":  # the listener's TLS handshake asks for it (mqtts:)
                target.options[key] = "true" if _bool(value, source, number) else "false"
            elif key in _PER_LISTENER:
                if given == "use_identity_as_username" and target.by_subject and not _bool(value, source, number):
                    # Mosquitto names the listener's clients by their certificate while either is
                    # true: taken, the false would let them give the username they like.
                    self._note(source, number, text, "this listener's use_subject_as_username true names its "
                                                     "clients by their certificate's subject still, as in Mosquitto")
                    return True
                if given == "use_subject_as_username":
                    target.by_subject = _bool(value, source, number)
                # Global settings here: the value given last, on whichever listener, applies to every one.
                ours, kind = _GLOBAL[key]
                self.out.settings[ours] = _value(kind, value, source, number)
                if key == "max_connections" and self.out.settings[ours] < 1:
                    self.out.settings[ours] = -1  # (Mosquitto 2 takes 0 and below for no limit)
                if given == "use_identity_as_username" and self.out.settings[ours]:
                    if self.out.settings.get("certificate_identity") == "subject":
                        raise ValueError(f"{source}:{number}: one listener names clients by their certificate's "
                                         f"common name, another by its subject (use_subject_as_username): here one "
                                         f"way applies to every listener")
                    self.identity_by_cn = True
                if key == "use_identity_as_username":
                    self.identities.append((target, self.out.settings[ours], given != key))
                target.limits[key] = (self.out.settings[ours], source, number, text)
            elif key == "protocol":
                protocol = _first(value)
                if protocol not in ("mqtt", "websockets"):
                    raise ValueError(f"{source}:{number}: protocol is mqtt or websockets, not {protocol!r}")
                target.options[key] = protocol
            elif key in ("certfile", "keyfile", "cafile"):
                target.options[key] = value
            elif key == "tls_version" and _first(value) == "tlsv1.3":
                raise ValueError(f"{source}:{number}: tls_version tlsv1.3 is not supported here: TLS 1.2 clients "
                                 f"would be let in")
            elif key == "socket_domain":
                domain = _first(value)
                if domain not in ("ipv4", "ipv6"):
                    raise ValueError(f"{source}:{number}: socket_domain is ipv4 or ipv6, not {domain!r}")
                target.options[key] = domain
                if domain == "ipv6" and not target.bind:
                    self._note_dual_stack(source, number, text)
            else:
                self._note(source, number, text, "no per-listener equivalent here")
        elif key in _PER_LISTENER and self.current is None:
            # Mosquitto's default listener's, at its default (it does not open it): in a file of
            # include_dir, it leaves the including file's listeners as they are.
            self._note(source, number, text, "the default listener's, which it does not open")
        else:
            return False
        return True

    def _subject_as_username(self, source: str, number: int, text: str, value: str) -> tuple[str, str]:
        """``use_subject_as_username``: ``use_identity_as_username`` with the subject as the
        identity (one way of naming clients by certificate for every listener here)."""
        if not _bool(value, source, number):
            return "use_subject_as_username", value  # (Mosquitto's default: nothing to carry over)
        if self.out.settings.get("certificate_identity", "subject") != "subject" or self.identity_by_cn:
            raise ValueError(f"{source}:{number}: one listener names clients by their certificate's subject, another "
                             f"by its common name (use_identity_as_username): here one way applies to every listener")
        self.out.settings["certificate_identity"] = "subject"
        self.out.notes.append(Note(source, number, text, "use_identity_as_username with certificate_identity "
                                   "\"subject\": the subject written as Mosquitto writes it", carried=True))
        return "use_identity_as_username", "true"

    def _persistence_line(self, source: str, number: int, text: str, key: str, value: str) -> bool:
        if key == "persistence":
            self.persistence = (source, number, text) if _bool(value, source, number) else None
        elif key == "persistence_location":
            self.location = value
        else:
            return False
        return True

    def _one_to_one_line(self, source: str, number: int, text: str, key: str, value: str) -> bool:
        if key == "message_size_limit":
            self.message_size_limit = (_value("int", value, source, number), source, number, text)
            if not 0 <= self.message_size_limit[0] <= 268_435_455:
                raise ValueError(f"{source}:{number}: message_size_limit must be 0 to 268435455, as Mosquitto takes it")
            return True
        if key not in _GLOBAL:
            return False
        ours, kind = _GLOBAL[key]
        settings = self.out.settings
        settings[ours] = _setting(kind, value, source, number)
        if key in _RANGES:
            low, high = _RANGES[key]
            if settings[ours] < low or high is not None and settings[ours] > high:
                bounds = f"{low} to {high}" if high is not None else f"{low} or more"
                raise ValueError(f"{source}:{number}: {key} must be {bounds}, as Mosquitto 2 takes it")
        # Mosquitto 2 starts with these below zero, and takes them for no limit.
        if key == "max_inflight_messages" and settings[ours] <= 0:
            settings[ours] = _MAX_INFLIGHT
            self.out.notes.append(Note(source, number, text, f"no limit in Mosquitto: {_MAX_INFLIGHT} here, the most "
                                       f"there can be", carried=True))
        elif key in ("max_queued_messages", "max_queued_bytes") and settings[ours] < 0:
            settings[ours] = 0
        elif key == "max_connections" and settings[ours] < 0:  # (before any listener: 0 opens the default one)
            settings[ours] = -1
        if key in ("max_queued_messages", "max_queued_bytes"):
            self.queue_lines[key] = (source, number, text)
        return True

    def _unsupported_line(self, source: str, number: int, text: str, key: str, value: str) -> None:
        if key in _TWISTD:
            self._note(source, number, text, f"done by {_TWISTD[key]}")
        elif key in _HANDLED_HERE:
            self._note(source, number, text, "the SQLite store commits each batch of changes and needs no tuning")
        elif key in _NO_LIMIT_HERE:
            self._note(source, number, text, _NO_LIMIT_HERE[key])
        elif key.startswith(("plugin_opt_", "auth_opt_")):
            self._note(source, number, text, "Mosquitto plugins do not load here")
        elif key not in _MOSQUITTO_KEYS:
            self._note(source, number, text, "no setting of Mosquitto 2.0.11 (which refuses to start with it), nor here")
        else:
            self._note(source, number, text, "no equivalent setting here")

    def finish(self) -> Conversion:
        """The conversion, with what needs every line: persistence, the listeners' settings that are
        global here, the bridges' bridge_capath, the endpoints."""
        settings = self.out.settings
        if self.persistence is not None:
            settings["persistence"] = "sqlite"
            if self.location:
                settings["data_dir"] = self.location.rstrip("/") or "/"
            self.out.notes.append(Note(*self.persistence, "as the SQLite store, which does not read Mosquitto's "
                                       "database (mosquitto.db): the broker starts without the retained messages, "
                                       "sessions and queued messages Mosquitto kept", carried=True))
            self._queue_bound_with_the_store(self.persistence)
        else:
            settings["persistence"] = "memory"
        settings["max_packet_size"] = min(settings.get("max_packet_size", _MOST_PACKET_SIZE), _MOST_PACKET_SIZE)
        if self.message_size_limit is not None and self.message_size_limit[0] > 0:
            size, source, number, text = self.message_size_limit
            settings["max_packet_size"] = min(settings["max_packet_size"], max(size, 20))
            self.out.notes.append(Note(source, number, text, f"as max_packet_size {settings['max_packet_size']}: it "
                                       f"limits whole packets, CONNECT and SUBSCRIBE too (a message whose payload fits "
                                       f"but whose topic takes it over is refused too), and a client that sends a "
                                       f"larger one is disconnected (MQTT 5: 0x95) rather than its message dropped",
                                       carried=True))
        if self.per_listener and self.default_port is None:
            # The default listener's password_file, or allow_zero_length_clientid false, opens it
            # (port 1883 on every interface), as Mosquitto 2's config__read does.
            opening = [(source, number, text) for key, value, source, number, text in self.before_listeners
                       if key == "password_file" or (key == "allow_zero_length_clientid" and value is False)]
            if opening:
                self.opened_by = opening[0]
                self.default_port = _Listener(1883, "", *self.opened_by[:2])
        listeners = self.listeners if self.default_port is None else [self.default_port, *self.listeners]
        self._identity_from_tls_listeners(listeners)
        if self.default_topic_alias is not None:
            value, source, number, text = self.default_topic_alias
            if self.default_port is not None:  # (opened by a port line, say; a listener line's applies over it)
                self.default_port.limits.setdefault("max_topic_alias", self.default_topic_alias)
                settings.setdefault("max_topic_alias", value)
            else:  # (without any listener line, Mosquitto's listeners on loopback keep 10 too)
                self._note(source, number, text, "before any listener line it is the default listener's (of a port "
                                                 "line), and there is none: the listeners keep Mosquitto's default, 10")
        counted = [listener.limits["max_connections"][0] if "max_connections" in listener.limits else -1
                   for listener in listeners]
        if len(listeners) > 1 and any(limit > 0 for limit in counted):
            # Mosquitto counts each listener's connections; here they are counted together.
            total = -1 if -1 in counted else sum(counted)
            settings["max_connections"] = total
            _, source, number, text = [lst.limits["max_connections"] for lst in listeners
                                       if "max_connections" in lst.limits][-1]
            self.out.notes.append(Note(source, number, text, f"each listener's in Mosquitto: here one limit of the "
                                       f"broker's connections, {total} (the listeners' added up)", carried=True))
        for key, default in _PER_LISTENER.items():
            values = {listener.limits[key][0] if key in listener.limits else default for listener in listeners}
            if len(values) > 1 and key != "max_connections":
                # (The value taken is the line read last's, which is not the last listener's when a
                # file of include_dir sets the default listener's.)
                given = [lst.limits[key] for lst in listeners if key in lst.limits]
                taken = settings.get(_GLOBAL[key][0], given[-1][0])
                _, source, number, text = ([g for g in given if g[0] == taken] or given)[-1]
                if key == "use_identity_as_username" and not taken:
                    # True for all only refuses clients without a certificate; false would let
                    # them claim a username where Mosquitto names them by their certificate.
                    named = next(lst for lst in listeners if lst.limits.get(key, (False,))[0])
                    raise ValueError(f"{source}:{number}: use_identity_as_username false would apply to every "
                                     f"listener here, the one of {named.source}:{named.line} too, whose clients "
                                     f"Mosquitto names by their certificate: a client with any certificate of its "
                                     f"CA would be taken by the username it gives (and get that user's ACL rights); "
                                     f"give every listener the same value")
                self.out.notes.append(Note(source, number, text, f"{key} differs between the listeners: here it is "
                                           f"global, {taken} for every listener", carried=True))
        if self.per_listener and listeners:
            self._listeners_security(listeners)
        elif self.per_listener:
            # No listener: Mosquitto listens on loopback only; global here, never more open than there.
            settings.update({key: converted for key, converted, *_ in self.before_listeners})
        for bridge_table, source, number, text in self.capaths:
            if "bridge_cafile" not in bridge_table:
                # Noting it would leave the bridge without TLS, its CONNECT (password too) in clear.
                raise ValueError(f"{source}:{number}: bridge_capath is not supported here: give bridge_cafile with "
                                 f"the remote's CA certificates instead")
            self._note(source, number, text, "the remote's certificate is checked against bridge_cafile only")
        for bridge_table, source, number, text in self.insecure:
            if "bridge_cafile" not in bridge_table and "bridge_certfile" not in bridge_table:
                # (here it is refused alone: it would promise TLS)
                del bridge_table["bridge_insecure"]
                self._note(source, number, text, "without TLS settings it changes nothing (Mosquitto connects "
                                                 "without TLS, as this bridge does)")
        _one_listener_per_port(listeners)
        endpoints: list[str] = []
        websockets: list[str] = []
        for listener in listeners:
            protocol, description = listener.endpoint()
            (websockets if protocol == "websockets" else endpoints).append(description)
            if ("certfile" in listener.options) != ("keyfile" in listener.options):
                self._note(listener.source, listener.line, f"listener {listener.port}", "certfile and keyfile go "
                           "together: with one alone Mosquitto listens without TLS, and so does this broker")
        if not listeners:
            # Mosquitto 2 without a listener: local only, anonymous clients welcome.
            endpoints = ["tcp:1883:interface=127.0.0.1"]
            if _ipv6_loopback():
                endpoints.append("tcp6:1883:interface=\\:\\:1")
            settings.setdefault("allow_anonymous", True)
        else:
            settings.setdefault("allow_anonymous", False)  # Mosquitto 2's default once a listener is set
        own = self.per_listener and bool(listeners) and "allow_anonymous" in listeners[0].security
        where = self.anonymous or self.opened_by
        if self.local_only and not settings["allow_anonymous"] and not own and where is not None:
            # Kept closed: a file that opens every interface by a listener setting alone is
            # more likely a mistake than a wish for anonymous clients from anywhere.
            self.out.notes.append(Note(*where, "Mosquitto 2 without a listener, port or bind_address line stays in "
                                       "its local-only mode, which lets anonymous clients in (on every interface "
                                       "where a listener setting opens its default listener); here they are "
                                       "refused: allow_anonymous true lets them in", carried=True))
        settings["endpoints"] = endpoints
        if websockets:
            settings["websocket_endpoints"] = websockets
        for table in self.out.bridges:
            table.setdefault("topic", [])
        return self.out

    def _queue_bound_with_the_store(self, persistence: tuple[str, int, str]) -> None:
        """Bound a session's messages in memory and in the store together, as Mosquitto bounds
        them with max_queued_messages and max_queued_bytes, persistence or not: with the store,
        QoS 1/2 messages past those wait in it, up to max_stored_messages, which is no bound at 0
        (the default) and takes one message at least."""
        settings = self.out.settings
        count, size = settings.get("max_queued_messages", _QUEUED), settings.get("max_queued_bytes", 0)
        if not count and not size:
            return  # (no bound in Mosquitto either)
        settings["max_stored_messages"] = 1
        if count > 1:
            settings["max_queued_messages"] = count - 1
            why = (f"max_queued_messages {count - 1} in memory and max_stored_messages 1: {count} QoS 1/2 messages of "
                   f"a session in all, as Mosquitto keeps (QoS 0 ones, never stored, {count - 1})")
        elif count:
            why = "max_stored_messages 1: 2 QoS 1/2 messages of a session in all, one more than Mosquitto keeps"
        else:
            why = "max_stored_messages 1: one message more than max_queued_bytes takes in memory may wait in the store"
        if count and size:
            why += "; past max_queued_bytes, one more message may wait in the store"
        where = self.queue_lines.get("max_queued_messages" if count else "max_queued_bytes", persistence)
        self.out.notes.append(Note(*where, f"with the store (persistence true): {why}", carried=True))

    def _identity_from_tls_listeners(self, listeners: list[_Listener]) -> None:
        """Leave out use_identity_as_username (use_subject_as_username) true of a listener without
        TLS: Mosquitto ignores it there, where here, global, it would refuse every client without
        a certificate, on every listener. (A false there is what Mosquitto does: kept.)"""
        plain = [listener for listener in listeners
                 if not listener.tls and listener.limits.get("use_identity_as_username", (False,))[0]]
        if not plain:
            return
        for listener in plain:
            _, source, number, text = listener.limits.pop("use_identity_as_username")
            self.out.notes = [n for n in self.out.notes if (n.source, n.line) != (source, number)]
            self._note(source, number, text, "a listener without TLS (certfile and keyfile): Mosquitto names no "
                                             "client by a certificate there, and ignores it")
        kept = [(value, subject) for listener, value, subject in self.identities if listener not in plain]
        settings = self.out.settings
        if kept:
            settings["use_identity_as_username"] = kept[-1][0]
        else:
            del settings["use_identity_as_username"]
        if not any(value and subject for value, subject in kept):
            settings.pop("certificate_identity", None)

    def _listeners_security(self, listeners: list[_Listener]) -> None:
        """With per_listener_settings: the listeners' authentication and ACLs, refused unless alike."""
        # Mosquitto gives what comes before the first listener to the default listener (of a port
        # line) only: a `listener` section keeps its own settings and Mosquitto 2's defaults.
        for key, converted, source, number, text in self.before_listeners:
            if self.default_port is not None:
                self.default_port.security[key] = converted
            else:
                self._note(source, number, text, "with per_listener_settings true it is the default listener's (of a "
                           "port line) only, and there is none")
        # Authentication and ACLs are the same for every listener here: the listeners must agree,
        # or one would be converted with another's (a password file dropped, anonymous clients let in).
        effective = [{**_SECURITY, **listener.security} for listener in listeners]
        for listener, its in zip(listeners[1:], effective[1:]):
            differ = [key for key in _SECURITY if its[key] != effective[0][key]]
            if differ:
                raise ValueError(f"{listener.source}:{listener.line}: this listener's {', '.join(differ)} "
                                 f"{'is' if len(differ) == 1 else 'are'} not the first one's (one not set is "
                                 f"Mosquitto's default: allow_anonymous false, no file); here they apply to every "
                                 f"listener alike: give each listener the same")
        given = {key for listener in listeners for key in listener.security}
        self.out.settings.update({key: value for key, value in effective[0].items()
                                  if value is not None and (key in ("allow_anonymous", "password_file", "acl_file")
                                                            or key in given)})


def convert(path: str | Path) -> Conversion:
    """Read a mosquitto.conf (and what it includes); raises OSError or ValueError for a file
    that cannot be read or a value that cannot be understood."""
    converter = _Converter(str(Path(path).resolve()))
    reading = ""
    sections: dict[str, tuple[_Listener | None, dict[str, Any] | None, int, int]] = {}
    for source, number, text, words in _lines(Path(path), set()):
        if source != reading:
            # Each file starts at the default listener and outside any connection, as in
            # Mosquitto, and the including file goes on where it was after the included ones;
            # unless those added a listener or a connection: Mosquitto's section is then in
            # memory it has moved (what it does with the lines that follow is undefined).
            out = converter.out
            sections[reading] = (converter.current, converter.bridge, len(converter.listeners), len(out.bridges))
            current, bridge, listeners, bridges = sections.get(source, (None, None, 0, 0))
            converter.current, converter.bridge = current, bridge
            converter.moved = {section for section, moved in (
                ("listener", current is not None and listeners != len(converter.listeners)),
                ("connection", bridge is not None and bridges != len(out.bridges))) if moved}
            reading = source
        converter.read(source, number, text, words[0])
    return converter.finish()


def _opens_default_listener(key: str, value: str) -> bool:
    """Whether this listener setting, before any listener line, makes Mosquitto open its default
    listener (Mosquitto 2.0's conf.c: any of them set, and not to its default)."""
    if key not in _MAKE_DEFAULT_LISTENER:
        return False
    default = _MAKE_DEFAULT_LISTENER[key]
    word = _first(value)
    if default is None:
        return True
    if isinstance(default, bool):
        return word not in ("false", "0")
    if isinstance(default, int):
        try:
            number = int(word)
        except ValueError:
            return True  # (refused as it is read)
        return number != default and not (key == "max_connections" and number < 0)  # (Mosquitto: < 0 is -1)
    return word != default


def _first(value: str) -> str:
    """A value's first word: Mosquitto reads no more of a boolean's or a number's line (the rest
    may be a comment)."""
    words = value.split(None, 1)
    return words[0] if words else ""


def _words(value: str) -> list[str]:
    """The words of a value up to a comment: Mosquitto stops at a word that begins with ``#``
    where a line takes several (a listener's, a bridge's addresses, a topic line's after its
    direction)."""
    words = value.split()
    for index, word in enumerate(words):
        if word.startswith("#"):
            return words[:index]
    return words


def _bridge_address(address: str, source: str, number: int) -> str:
    """A bridge address as Mosquitto reads it, the port after its last colon (an IPv6 address
    without brackets: ::1:1883), written as this broker's bridges read it ([::1]:1883)."""
    host, _, port = address.rpartition(":")
    if ":" not in host or address.startswith("["):  # (a bracketed one is a host name to Mosquitto)
        return address
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{source}:{number}: bridge address {address!r}: Mosquitto takes what follows its last colon "
                         f"for the port, and {host!r} for the host, which is no address (an IPv6 address goes with "
                         f"its port: ::1:1883)") from None
    return f"[{host}]:{port}"


def _bool(value: str, source: str, number: int) -> bool:
    value = _first(value)
    if value in ("true", "false", "1", "0"):  # as Mosquitto reads them
        return value in ("true", "1")
    raise ValueError(f"{source}:{number}: {value!r} is not true, false, 1 or 0")


def _setting(kind: str, value: str, source: str, number: int) -> Any:
    """A global setting's value: a relative path is the including file's."""
    if kind == "path" and not value:
        raise ValueError(f"{source}:{number}: an empty value, which Mosquitto refuses")
    if kind == "path" and not Path(value).is_absolute():
        value = str(Path(source).parent / value)
    return _value(kind, value, source, number)


_UNITS = {"h": 3600, "d": 86400, "w": 7 * 86400, "m": 30 * 86400, "y": 365 * 86400}


def _value(kind: str, value: str, source: str, number: int) -> Any:
    if kind in ("bool", "int", "float", "duration", "atoi"):
        value = _first(value)
    try:
        if kind == "bool":
            return _bool(value, source, number)
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "atoi":  # as Mosquitto reads some, C's atoi: its leading digits ("0.5" is 0)
            digits = re.match(r"[+-]?[0-9]+", value)
            return int(digits.group()) if digits else 0
        if kind == "duration":  # Mosquitto's persistent_client_expiration: 1h, 2d, 1w, 1m, 1y (a unit needed)
            seconds = int(value[:-1]) * _UNITS[value[-1]]
            if seconds <= 0:
                raise ValueError
            return seconds
    except (ValueError, KeyError):
        raise ValueError(f"{source}:{number}: {value!r} is not a valid {kind}") from None
    return value


def main(argv: list[str] | None = None) -> int:
    """``mqttbroker-config from-mosquitto FILE``: the TOML on stdout, what is not carried over on
    stderr (and as comments at the top of the TOML)."""
    parser = argparse.ArgumentParser(prog="mqttbroker-config", description="Convert broker configurations.")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("from-mosquitto", help="write the TOML equivalent of a mosquitto.conf")
    command.add_argument("file", help="the mosquitto.conf to read (include_dir is followed)")
    args = parser.parse_args(argv)
    try:
        conversion = convert(args.file)
        conversion.config()  # refuse what would not start
    except OSError as e:
        print(f"mqttbroker-config: {args.file}: {e.strerror or e}", file=sys.stderr)
        return 1
    except ValueError as e:  # (each names its file and line, or the setting: ConfigError)
        print(f"mqttbroker-config: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(conversion.toml(args.file))
    for note in conversion.notes:
        print(f"mqttbroker-config: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

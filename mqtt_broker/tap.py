"""``twistd mqttbroker``: command-line options and the service tree they build."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from twisted.logger import Logger
from twisted.python import usage

from .config import BrokerConfig, ConfigError, settings

log = Logger()

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.python.failure import Failure

    from .broker import BrokerService


def _flag_name(name: str) -> str:
    return name.replace("_", "-")


def _show(value: Any) -> str:
    """A default as it is typed on the command line (``true``, not ``True``)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _endpoint_problem(description: str, backlog: int) -> str | None:
    """Why ``description``, with the listen queue of ``backlog`` that the broker adds unless it
    gives one, is not a server endpoint Twisted can parse, or None if it is."""
    # Parsing is all this does; nothing listens. (The broker's own parser: Twisted's would ask
    # for an encrypted key's passphrase on the terminal.)
    from twisted.internet import reactor

    from .auth.tls import server_endpoint
    from .broker import with_backlog
    try:
        server_endpoint(reactor, with_backlog(description, backlog))
    except OSError:
        # ssl: reads its key and certificate while parsing. Relative paths are relative to
        # twistd's --rundir, which twistd enters after parsing options: leave files to startService.
        return None
    except Exception as e:  # a parser (ours or a plugin's) may raise anything; report it as usage
        return str(e) or type(e).__name__
    return None


def _replace(config: BrokerConfig, flag: str, **changes: Any) -> BrokerConfig:
    try:
        return config.replace(**changes)
    except ConfigError as e:
        raise usage.UsageError(f"{flag}: {e.reason}") from None


TWISTD_DEFAULTS: dict[str, Any] = {"persistence": "sqlite"}
"""Where ``twistd mqttbroker``'s defaults differ from :class:`BrokerConfig`'s (an embedded
broker's): as a server, the broker keeps its state on disk unless told otherwise."""

# List settings are repeatable flags of their own; given at all, a flag replaces the file's list.
_LIST_FLAGS = {"endpoints": "endpoint", "websocket_endpoints": "websocket", "websocket_paths": "websocket-path",
               "websocket_trusted_proxies": "websocket-trusted-proxy", "websocket_origins": "websocket-origin",
               "http_endpoints": "http",
               "http_api_keys": "http-api-key", "history_filters": "history-filter"}


class Options(usage.Options):
    """Every setting of :class:`BrokerConfig` is a flag too; flags override the config file.

    After ``parseOptions``, ``options["broker_config"]`` is the resulting :class:`BrokerConfig`;
    a bad flag, file or setting raises ``usage.UsageError`` naming it.
    """

    synopsis = "[options]"
    longdesc = ("Runs an MQTT broker. Settings come from --config (TOML), then from flags. "
                "--endpoint replaces the endpoints of the config file; with neither it "
                "listens on tcp:1883. --websocket adds MQTT over WebSocket listeners.")
    optParameters = [
        ["config", "c", None, "TOML configuration file (see mqttbroker.example.toml)."],
        ["mosquitto-config", None, None, "A mosquitto.conf to run with, converted as mqttbroker-config "
         "from-mosquitto does (--config and flags apply over it)."],
    ] + [
        [_flag_name(f.name), None, None, f"{f.metadata['help']} [default: {_show(TWISTD_DEFAULTS.get(f.name, f.default))}]"]
        for f in settings() if f.name not in _LIST_FLAGS and not f.metadata["table"]
    ]

    def __init__(self) -> None:
        super().__init__()
        for name in _LIST_FLAGS:
            self[name] = []

    def parseOptions(self, options: list[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            # Run by twistd, whose answer to a usage error is the whole --help and then the error.
            raise SystemExit(f"mqttbroker: {e} (--help lists the settings)") from None

    # The docstring is the --help text, on one line: usage.Options keeps a continuation's indent.
    def opt_version(self) -> NoReturn:
        """Show the versions of mqtt_broker (compiled or pure Python) and of Twisted, and exit."""
        from twisted import copyright

        from . import __version__, compiled
        print(f"mqtt_broker {__version__} ({'compiled' if compiled else 'pure Python'})")
        print(f"Twisted {copyright.version}")
        sys.exit(0)

    def opt_endpoint(self, description: str) -> None:
        """Listen on a Twisted endpoint, e.g. tcp:1883 or ssl:8883:privateKey=key.pem; repeatable [default: tcp:1883]."""
        self["endpoints"].append(description)

    opt_e = opt_endpoint

    def opt_websocket(self, description: str) -> None:
        """Listen for MQTT over WebSocket on a Twisted endpoint, e.g. tcp:8083 or ssl:8084:privateKey=key.pem; repeatable."""
        self["websocket_endpoints"].append(description)

    def opt_websocket_path(self, path: str) -> None:
        """Accept WebSocket clients only on this request path (e.g. /mqtt); repeatable [default: any path]."""
        self["websocket_paths"].append(path)

    def opt_websocket_trusted_proxy(self, address: str) -> None:
        """Trust X-Forwarded-For from this proxy address or network (e.g. 10.0.0.0/8); repeatable."""
        self["websocket_trusted_proxies"].append(address)

    def opt_websocket_origin(self, origin: str) -> None:
        """Let web pages of this origin (e.g. https://app.example.com) open MQTT over WebSocket, refusing others; repeatable [default: any]."""
        self["websocket_origins"].append(origin)

    def opt_http(self, description: str) -> None:
        """Serve the admin HTTP API, /metrics and the dashboard on a Twisted endpoint, e.g. tcp:8080 or ssl:8443:privateKey=key.pem; repeatable."""
        self["http_endpoints"].append(description)

    def opt_http_api_key(self, hashed: str) -> None:
        """Accept this hashed admin API key (sha256:<hex>, from python -m mqtt_broker.admin.keys); repeatable."""
        self["http_api_keys"].append(hashed)

    def opt_history_filter(self, topic_filter: str) -> None:
        """Keep the messages of this topic filter in the message log, for replay; repeatable."""
        self["history_filters"].append(topic_filter)

    @staticmethod
    def _from_mosquitto(path: str, quiet: bool = False) -> BrokerConfig:
        from .mosquitto import convert
        try:
            conversion = convert(path)
        except OSError as e:
            raise usage.UsageError(f"--mosquitto-config {path}: {e.strerror or e}") from None
        except ConfigError:
            raise
        except ValueError as e:
            raise usage.UsageError(f"--mosquitto-config: {e}") from None
        for note in conversion.notes if not quiet else ():
            print(f"mqttbroker: {note}", file=sys.stderr)
        try:
            return conversion.config()  # type: ignore[no-any-return]
        except ConfigError as e:
            raise usage.UsageError(f"--mosquitto-config {path}: {e}") from None

    def postOptions(self) -> None:
        # Absolute: twistd enters --rundir after parsing, and SIGHUP reads the files again.
        for name in ("config", "mosquitto-config"):
            if self[name]:
                self[name] = os.path.abspath(self[name])
        self["broker_config"] = self.read_config()

    def read_config(self, again: bool = False) -> BrokerConfig:
        """The settings the files and flags give: read ``again`` (SIGHUP), without the notes of a
        converted mosquitto.conf. Raises ``usage.UsageError`` naming what is wrong."""
        try:
            base = BrokerConfig(**TWISTD_DEFAULTS)
            if self["mosquitto-config"]:
                base = self._from_mosquitto(self["mosquitto-config"], quiet=again)
            config = BrokerConfig.from_file(self["config"], base) if self["config"] else base
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        # One flag at a time, so that an error names the flag rather than the setting.
        for f in settings():
            if f.name in _LIST_FLAGS or f.metadata["table"]:
                continue
            flag = "--" + _flag_name(f.name)
            text = self[_flag_name(f.name)]
            if text is None:
                continue
            kind: Any = type(f.default)
            try:
                value = _bool(text) if kind is bool else kind(text)
            except ValueError:
                raise usage.UsageError(f"{flag}: expected {kind.__name__}, got {text!r}") from None
            config = _replace(config, flag, **{f.name: value})
        for name, flag in _LIST_FLAGS.items():
            if self[name]:
                config = _replace(config, "--" + flag, **{name: self[name]})

        def source(name: str) -> str:
            if self[name]:
                return "--" + _LIST_FLAGS[name]
            return f"{self['config']}: {name}" if self["config"] else name

        if not config.endpoints and not config.websocket_endpoints:
            raise usage.UsageError(f"{source('endpoints')}: no endpoint to listen on")
        for name in ("endpoints", "websocket_endpoints", "http_endpoints"):
            for description in getattr(config, name):
                problem = _endpoint_problem(description, config.listen_backlog)
                if problem is not None:
                    raise usage.UsageError(f"{source(name)} {description!r}: {problem}")
        return config


def makeService(options: Options) -> BrokerService:
    """The broker service (an ``IService``) for parsed ``options``, not started: twistd starts it,
    and a port that cannot be bound then fails start-up."""
    if options.parent is not None:
        _say_start_up_failures_in_one_line()
    from .broker import BrokerService  # the reactor is imported here, not when twistd lists plugins
    config: BrokerConfig = options["broker_config"]
    # twistd enters --rundir once the service is made: what it reads now (password and ACL files,
    # keys) is read from there too, as at each SIGHUP after. (One that does not exist, twistd reports.)
    rundir = options.parent.get("rundir", ".") if options.parent is not None else "."
    with contextlib.chdir(rundir if os.path.isdir(rundir) else "."):
        service = BrokerService(config=config)
    service.config_check = lambda: _config_problems(service, options)
    _reload_on_sighup(service, options)
    from twisted.internet import reactor
    reactor.addSystemEventTrigger("after", "startup", tune_gc)  # type: ignore[attr-defined]
    service.on_given_up = reactor.stop  # type: ignore[attr-defined]
    return service


def _say_start_up_failures_in_one_line() -> None:
    """In a process that twistd runs: a start-up failure the operator is to mend (a port in use, a
    data directory or password file that cannot be read) is told as one line, not under a
    traceback. It stays an exception, for what twistd does with one: a daemon's parent process
    reports it, and the pid file is removed."""
    from twisted.internet.error import CannotListenError

    from .store import StoreError

    from twisted.internet import reactor

    default = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, traceback: Any) -> None:
        if issubclass(kind, (CannotListenError, StoreError, ConfigError)):
            print(f"mqttbroker: cannot start: {value}", file=sys.stderr)
        else:
            default(kind, value, traceback)
    sys.excepthook = hook
    reactor.callWhenRunning(setattr, sys, "excepthook", default)  # type: ignore[attr-defined]  # started: as it was


GC_THRESHOLD = (10_000, 50, 100)


def tune_gc() -> None:
    """The collector of a twistd broker process (not of an application that embeds the broker: that
    is its own to tune). Python's default starts a young collection every 700 new containers, and
    every full collection walks every object alive, the tens of thousands of the modules loaded at
    start-up too. A connection creates a few dozen, so with the defaults the collector took about a
    tenth of the broker's time per connection in the connections benchmark. What start-up made is
    moved out of the collector's sight (``gc.freeze``), and collections are rarer; garbage cycles
    (a broken connection's Failure, say) still go, a little later."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def _reload_on_sighup(service: BrokerService, options: Options) -> None:
    """SIGHUP re-reads the password file, ACL file, keys and TLS certificates, as it does for
    Mosquitto (see ``BrokerService.reload``), from now on: before the reactor runs, a SIGHUP
    (an early ``systemctl reload``) would end the process."""
    import signal

    from twisted.internet import reactor

    def handler(signum: int, frame: Any) -> None:
        reactor.callFromThread(reload, service, options)  # type: ignore[attr-defined]

    signal.signal(signal.SIGHUP, handler)


def reload(service: BrokerService, options: Options) -> Deferred[list[str] | None]:
    """What SIGHUP does: ``service.reload()``, which reads ``options``' files again too
    (``_config_problems``, the service's ``config_check``)."""
    def failed(failure: Failure) -> None:
        log.failure("reloading", failure)
    return service.reload().addErrback(failed)


def _config_problems(service: BrokerService, options: Options) -> Deferred[list[str]] | list[str]:
    """A warning, and a problem, naming the settings the files or flags now give otherwise, which
    only a restart applies (a changed ``acl_file`` path, say), or what would stop a restart."""
    try:
        config = options.read_config(again=True)
    except usage.UsageError as e:
        log.warn("the configuration cannot be read now ({error}): a restart may fail", error=str(e))
        return [f"the configuration cannot be read now ({e}): a restart may fail"]
    names = [f.name for f in settings() if getattr(config, f.name) != getattr(service.config, f.name)]
    if not names:
        return []
    changed = ", ".join(names)
    log.warn("settings changed since the broker started are not applied until it restarts: {names}", names=changed)
    problems = [f"settings changed since the broker started are not applied until it restarts: {changed}"]

    def read_as_a_restart_would() -> None:  # (the files of new paths, say: in the thread pool, as a reload's)
        from .auth import load_acl
        from .auth.authenticators import authenticators_from_config
        authenticators_from_config(config, service.reactor)
        if config.acl_file:
            load_acl(config.acl_file)

    def would_fail(failure: Failure) -> None:
        failure.trap(ConfigError)
        log.error("a restart would fail: {error}", error=str(failure.value))
        problems.append(f"a restart would fail: {failure.value}")
    from .auth.authenticators import in_thread
    return in_thread(service.reactor, read_as_a_restart_would).addErrback(would_fail).addCallback(lambda _: problems)


__all__ = ["Options", "TWISTD_DEFAULTS", "makeService", "reload"]

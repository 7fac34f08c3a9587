"""``twistd mqttbroker``: command-line options and the service tree they build."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from .config import BrokerConfig, ConfigError, settings


def _flag_name(name: str) -> str:
    return name.replace("_", "-")


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


class Options(usage.Options):
    """Every setting of :class:`BrokerConfig` is a flag too; flags override the config file."""

    synopsis = "[options]"
    longdesc = ("Runs an MQTT broker. Settings come from --config (TOML), then from flags. "
                "With no --endpoint and no endpoints in the config file it listens on tcp:1883.")
    optParameters = [
        ["config", "c", None, "TOML configuration file (see mqttbroker.example.toml)."],
    ] + [
        [_flag_name(f.name), None, None,
         f"{f.metadata['help']} [default: {f.default}]"]
        for f in settings() if f.name != "endpoints"
    ]

    def __init__(self) -> None:
        super().__init__()
        self["endpoints"] = []

    def opt_endpoint(self, description: str) -> None:
        """Listen on a Twisted endpoint, e.g. tcp:1883 or ssl:8883:privateKey=key.pem:certKey=cert.pem
        (repeat for several) [default: tcp:1883]."""
        self["endpoints"].append(description)

    opt_e = opt_endpoint

    def postOptions(self) -> None:
        try:
            config = BrokerConfig.from_file(self["config"]) if self["config"] else BrokerConfig()
            overrides: dict[str, Any] = {}
            for f in settings():
                if f.name == "endpoints":
                    continue
                text = self[_flag_name(f.name)]
                if text is None:
                    continue
                kind = type(f.default)
                try:
                    overrides[f.name] = _bool(text) if kind is bool else kind(text)
                except ValueError:
                    raise ConfigError(f"--{_flag_name(f.name)}: expected {kind.__name__}, got {text!r}") from None
            if self["endpoints"]:
                overrides["endpoints"] = self["endpoints"]
            self["broker_config"] = config.replace(**overrides)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> IService:
    from .broker import BrokerService  # the reactor is imported here, not when twistd lists plugins
    config: BrokerConfig = options["broker_config"]
    return BrokerService(config=config)


__all__ = ["Options", "makeService"]

"""Operations: ``$SYS`` topics, Prometheus metrics, the admin HTTP API and the dashboard.

None of it is on the hot path: the broker counts with plain integers in
:class:`~mqtt_broker.stats.Stats`, and these modules read the counters when they report.

- :mod:`.figures`: the numbers, derived from the counters and the broker's state;
- :mod:`.sys`: the ``$SYS/broker/...`` topics (Mosquitto's);
- :mod:`.metrics`: ``/metrics`` for Prometheus, and the monitors that time the reactor, the
  store and the delivery of sampled messages;
- :mod:`.api`: the JSON API under ``/api/v1`` and its OpenAPI document;
- :mod:`.keys`: hashed API keys (``python -m mqtt_broker.admin.keys`` makes one);
- :mod:`.dashboard`: the page at ``/`` and the twisted.web site that holds everything.

:class:`Operations` is the service a :class:`~mqtt_broker.broker.BrokerService` holds as
``broker.operations``; ``broker.operations.site()`` is the twisted.web site, to listen on or to
mount in a web server of one's own.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService


class Operations(MultiService):
    """The $SYS publisher (when ``sys_interval`` is set) and, once the site is built, the
    monitors behind /metrics. Its start is the broker's start, from which uptime counts.
    On a cluster node, ``inbox_lag`` keeps the last known lag of the node's inbox (None
    otherwise)."""

    def __init__(self, broker: Any) -> None:
        super().__init__()
        self.broker = broker
        self.started_at: float | None = None
        self.sys: Any = None
        self.monitors: Any = None
        self._site: Any = None
        self.inbox_lag: Any = None
        if broker.cluster is not None:
            from .figures import InboxLag
            self.inbox_lag = InboxLag(broker.cluster)
        if broker.config.sys_interval:
            from .sys import SysTopics
            self.sys = SysTopics(broker, broker.config.sys_interval, lambda: self.started_at, self.inbox_lag)
            self.sys.setServiceParent(self)

    def startService(self) -> None:
        self.started_at = self.broker.clock.seconds()
        super().startService()

    def site(self) -> Any:
        """The twisted.web ``Site`` of the dashboard, the API and /metrics (built once)."""
        if self._site is None:
            from .dashboard import make_site
            from .metrics import Monitors
            self.monitors = Monitors(self.broker)
            self.monitors.setServiceParent(self)
            self._site = make_site(self.broker, self)
        return self._site


__all__ = ["Operations"]

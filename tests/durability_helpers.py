"""Helpers for the store, durability and restart tests: reading a database from a second
connection, what a kill -9 would leave on disk, captured log events, a broker restarted
in-process on the same store and clock."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher

from mqtt_broker import BrokerService
from mqtt_broker.store import Store
from mqtt_broker.wire import Puback, Pubcomp, Publish, Pubrec, Pubrel


def rows(path: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Query the database file from a connection of our own (what is committed, not what a
    store has in hand)."""
    with closing(sqlite3.connect(str(path))) as db:
        return db.execute(sql, args).fetchall()


def crash_copy(path: Path, dest: Path) -> Path:
    """What a kill -9 at this moment would leave: the committed content of ``path`` (WAL
    included), copied to ``dest``. Whatever a store has recorded but not yet written is not in
    it, as it would not be after a crash."""
    with closing(sqlite3.connect(str(path))) as source, closing(sqlite3.connect(str(dest))) as target:
        source.backup(target)
    return dest


class CapturedLog:
    """Log events emitted while it is open (``with CapturedLog() as log:``)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __enter__(self) -> CapturedLog:
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self.events.append)

    def texts(self) -> list[str]:
        return [formatEvent(event) or "" for event in self.events]

    def matching(self, text: str) -> list[str]:
        return [line for line in self.texts() if text in line]

    def failures(self) -> list[dict[str, Any]]:
        return [event for event in self.events if "log_failure" in event]


class Restarts:
    """One broker after another on the same store and, for MemoryReactorClock tests, the same
    clock: ``start()`` the first, ``restart()`` stops it (``stopService``) and starts the next.
    ``store`` is a store or a callable making the store of each broker (a new SQLiteStore on
    the same file). The brokers close connections at once (``close_linger`` 0): the fake
    clients never close their side, so a lingering close would hold ``stopService`` until the
    clock moved on."""

    def __init__(self, store: Store | Callable[[], Store], reactor: Any = None, **settings: Any) -> None:
        self.reactor = reactor if reactor is not None else MemoryReactorClock()
        self._store = store
        self.settings = {"close_linger": 0, **settings}
        self.broker: BrokerService | None = None
        self.generations = 0

    def _new_store(self) -> Store:
        return self._store() if callable(self._store) else self._store

    def start(self) -> BrokerService:
        assert self.broker is None, "stop the running broker first"
        broker = BrokerService(endpoints=[], reactor=self.reactor, store=self._new_store(), **self.settings)
        broker.startService()
        self.broker = broker
        self.generations += 1
        return broker

    def stop(self) -> Deferred[None]:
        broker, self.broker = self.broker, None
        if broker is None:
            return succeed(None)
        return broker.stopService()

    def restart(self) -> BrokerService:
        """Stop and start again at once (for stores whose close() fires at once)."""
        stopped = self.stop()
        assert stopped.called, "the store did not close at once: use stop() and start()"
        return self.start()


class Receiver:
    """A subscriber's side of QoS 1 and 2, as a correct client does it (Method B of the MQTT
    specification's QoS 2 flow): a QoS 2 PUBLISH goes to the application when it first comes
    and its packet id is kept until the PUBREL; a PUBLISH with a kept id is a resend and does
    not go to the application again. Its state outlives connections, as a client session's
    does. ``handle(packet)`` returns the packets to answer with."""

    def __init__(self) -> None:
        self.awaiting_pubrel: set[int] = set()
        self.delivered: list[Publish] = []
        """What the application got, in order."""

    def handle(self, packet: Any) -> list[Any]:
        if isinstance(packet, Publish):
            if packet.qos == 0:
                self.delivered.append(packet)
                return []
            if packet.qos == 1:
                self.delivered.append(packet)
                return [Puback(packet_id=packet.packet_id)]
            if packet.packet_id not in self.awaiting_pubrel:
                self.awaiting_pubrel.add(packet.packet_id)
                self.delivered.append(packet)
            return [Pubrec(packet_id=packet.packet_id)]
        if isinstance(packet, Pubrel):
            self.awaiting_pubrel.discard(packet.packet_id)
            return [Pubcomp(packet_id=packet.packet_id)]
        return []

    def payloads(self) -> list[bytes]:
        return [p.payload for p in self.delivered]

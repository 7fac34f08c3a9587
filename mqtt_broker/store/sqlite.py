"""The SQLite store: one file in WAL mode, written in batches on one writer thread.

Changes recorded on the reactor thread wait in a list; at most one batch is being written at a
time, so while a commit is on disk the next batch grows, and under load many messages share one
transaction and one fsync (group commit). A delivery that is acknowledged before its batch is
written is dropped from the batch with its insert (a message to an online client costs no disk
write at all when the client is quick).
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ..history import Entry
from ..message import Message
from ..session import Outgoing, Queued, Session
from ..topics import Subscription
from ..wire.codes import MQTTError
from ..wire.packets import PUBLISH
from ..wire.properties import decode_properties, encode_properties
from . import CHANGE_BYTES, MAX_UNWRITTEN_BYTES, Snapshot, StoredWill, StoreError, call, fire, first_within

log = Logger()
_T = TypeVar("_T")

RETRY_AFTER = 1.0
"""Seconds after a failed write before it is tried again (with what came meanwhile)."""

VERSION = 1
"""The schema's version (``PRAGMA user_version``; 0.1.0's databases have 0). A database of a later
one is refused: this release would not know what it holds."""

APPLICATION_ID = 0x4D515442
"""``PRAGMA application_id`` of the broker's databases ("MQTB"), which says another program's
file from this broker's (those made before it was set hold only this broker's tables)."""

_REFUSED = (ValueError, OverflowError, sqlite3.InterfaceError, sqlite3.ProgrammingError, sqlite3.IntegrityError,
            sqlite3.DataError)
"""What sqlite3 raises for one change it cannot take, however often it tries (a str with a lone
surrogate, an int beyond 64 bits, a constraint): that change is dropped, not taken for a disk
that fails, whose batches are kept and tried again with everything after them."""

_CANNOT_WRITE = ("SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_FULL", "SQLITE_IOERR", "SQLITE_PERM")
"""Errors of the disk, not of the database: moving the file away would lose sound data."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    client_id TEXT PRIMARY KEY, expiry INTEGER NOT NULL, disconnected_at REAL, next_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS subscriptions (
    client_id TEXT NOT NULL, topic_filter TEXT NOT NULL, qos INTEGER NOT NULL, no_local INTEGER NOT NULL,
    retain_as_published INTEGER NOT NULL, retain_handling INTEGER NOT NULL, subscription_id INTEGER,
    share_group TEXT, PRIMARY KEY (client_id, topic_filter));
CREATE TABLE IF NOT EXISTS deliveries (
    client_id TEXT NOT NULL, seq INTEGER NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL,
    qos INTEGER NOT NULL, retain INTEGER NOT NULL, properties BLOB NOT NULL, expires_at REAL,
    subscription_ids TEXT NOT NULL, share TEXT, packet_id INTEGER, released INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (client_id, seq));
CREATE TABLE IF NOT EXISTS awaiting_pubrel (
    client_id TEXT NOT NULL, packet_id INTEGER NOT NULL, PRIMARY KEY (client_id, packet_id));
CREATE TABLE IF NOT EXISTS retained (
    topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL, properties BLOB NOT NULL,
    expires_at REAL, sender TEXT);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL,
    properties BLOB NOT NULL, expires_at REAL, at REAL NOT NULL, sender TEXT);
CREATE TABLE IF NOT EXISTS wills (
    client_id TEXT PRIMARY KEY, username TEXT, topic TEXT NOT NULL, payload BLOB NOT NULL,
    qos INTEGER NOT NULL, retain INTEGER NOT NULL, properties BLOB NOT NULL, expires_at REAL,
    due REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value REAL NOT NULL);
"""

_INSERT_DELIVERY = ("INSERT OR REPLACE INTO deliveries (client_id, seq, topic, payload, qos, retain, properties, "
                    "expires_at, subscription_ids, share, packet_id, released) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)")
_UPDATE_DELIVERY = "UPDATE deliveries SET packet_id = ?, released = ? WHERE client_id = ? AND seq = ?"
_DELETE_DELIVERY = "DELETE FROM deliveries WHERE client_id = ? AND seq = ?"
_INSERT_PUBREL = "INSERT OR REPLACE INTO awaiting_pubrel (client_id, packet_id) VALUES (?,?)"
_DELETE_PUBREL = "DELETE FROM awaiting_pubrel WHERE client_id = ? AND packet_id = ?"
_SAVE_RETAINED = ("INSERT OR REPLACE INTO retained (topic, payload, qos, properties, expires_at, sender) "
                  "VALUES (?,?,?,?,?,?)")
_DELETE_RETAINED = "DELETE FROM retained WHERE topic = ?"
_SAVE_HISTORY = ("INSERT OR REPLACE INTO history (seq, topic, payload, qos, properties, expires_at, at, sender) "
                 "VALUES (?,?,?,?,?,?,?,?)")
_FORGET_HISTORY = "DELETE FROM history WHERE seq < ?"
_DROP_HISTORY = "DELETE FROM history WHERE seq = ?"
_SAVE_SESSION = "INSERT OR REPLACE INTO sessions (client_id, expiry, disconnected_at, next_seq) VALUES (?,?,?,?)"
_SAVE_SUBSCRIPTION = ("INSERT OR REPLACE INTO subscriptions (client_id, topic_filter, qos, no_local, "
                      "retain_as_published, retain_handling, subscription_id, share_group) VALUES (?,?,?,?,?,?,?,?)")
_DELETE_SUBSCRIPTION = "DELETE FROM subscriptions WHERE client_id = ? AND topic_filter = ?"
_SAVE_WILL = ("INSERT OR REPLACE INTO wills (client_id, username, topic, payload, qos, retain, properties, "
              "expires_at, due) VALUES (?,?,?,?,?,?,?,?,?)")
_DELETE_WILL = "DELETE FROM wills WHERE client_id = ?"
_ALIVE = "INSERT OR REPLACE INTO meta (key, value) VALUES ('alive', ?)"
_ROWS: dict[str, tuple[str, int]] = {
    _SAVE_SESSION: ("sessions", 1), "DELETE FROM sessions WHERE client_id = ?": ("sessions", 1),
    _SAVE_SUBSCRIPTION: ("subscriptions", 2), _DELETE_SUBSCRIPTION: ("subscriptions", 2),
    _SAVE_WILL: ("wills", 1), _DELETE_WILL: ("wills", 1), _ALIVE: ("meta", 0)}
"""Statements that set or delete one whole row, named by their first arguments: of several for
one row in a batch, the last does what they all do."""

Statement = tuple[str, tuple[Any, ...]]

_PAYLOADS = {_INSERT_DELIVERY: 3, _SAVE_RETAINED: 1, _SAVE_HISTORY: 2, _SAVE_WILL: 3}
"""Where the statements that hold a message have its payload among their arguments."""


def _size(statement: Statement) -> int:
    """What ``statement`` counts in ``SQLiteStore.unwritten_bytes``."""
    sql, args = statement
    at = _PAYLOADS.get(sql)
    return CHANGE_BYTES if at is None else CHANGE_BYTES + len(args[at])


def compacted(batch: list[Statement]) -> list[Statement]:
    """``batch`` without the statements that later ones in it undo or replace, as the pending
    batch is kept by the ``_inserts`` and ``_pubrels`` indexes: a batch that failed is written again
    with what came after it, and while the disk fails, what waits must stay the size of the data it
    changes, not grow with every message."""
    kept: list[Statement | None] = list(batch)
    inserts: dict[tuple[Any, ...], int] = {}
    updates: dict[tuple[Any, ...], int] = {}
    pubrels: dict[tuple[Any, ...], int] = {}
    retained: dict[str, int] = {}
    history: dict[int, int] = {}
    rows: dict[tuple[Any, ...], int] = {}
    forget = -1
    for i, (sql, args) in enumerate(batch):
        row = _ROWS.get(sql)
        if row is not None:
            key = (row[0], *args[:row[1]])
            j = rows.get(key)
            if j is not None:
                kept[j] = None
            rows[key] = i
        elif sql == _INSERT_DELIVERY:
            inserts[args[:2]] = i
        elif sql == _UPDATE_DELIVERY or sql == _DELETE_DELIVERY:
            key = args[2:] if sql == _UPDATE_DELIVERY else args
            j = inserts.get(key)
            if j is None:  # a row written before: only its last change counts
                j = updates.pop(key, None)
                if j is not None:
                    kept[j] = None
                if sql == _UPDATE_DELIVERY:
                    updates[key] = i
                continue
            kept[i] = None
            if sql == _DELETE_DELIVERY:  # never written: nothing to delete
                kept[j] = None
                del inserts[key]
            else:
                insert = kept[j]
                assert insert is not None
                kept[j] = (insert[0], (*insert[1][:10], args[0], int(args[1])))
        elif sql == _INSERT_PUBREL:
            pubrels[args] = i
        elif sql == _DELETE_PUBREL:
            j = pubrels.pop(args, None)
            if j is not None:
                kept[i] = kept[j] = None
        elif sql == _SAVE_RETAINED or sql == _DELETE_RETAINED:
            j = retained.get(args[0])
            if j is not None:
                kept[j] = None
            retained[args[0]] = i
        elif sql == _SAVE_HISTORY:
            history[args[0]] = i
        elif sql == _DROP_HISTORY:
            j = history.pop(args[0], None)
            if j is not None:  # never written: nothing to drop
                kept[i] = kept[j] = None
        elif sql == _FORGET_HISTORY:
            for seq in [seq for seq in history if seq < args[0]]:
                kept[history.pop(seq)] = None
            if forget >= 0 and batch[forget][1][0] <= args[0]:
                kept[forget] = None
            forget = i
    return [statement for statement in kept if statement is not None]


def _props(message: Message) -> bytes:
    return encode_properties(message.properties)


def _message(topic: str, payload: bytes, qos: int, retain: bool, properties: bytes, expires_at: float | None,
             sender: str | None = None) -> Message:
    props = decode_properties(properties, 0, PUBLISH)[0] if properties != b"\x00" else {}
    return Message(topic=topic, payload=bytes(payload), qos=qos, retain=bool(retain), properties=props,
                   expires_at=expires_at, sender=sender)


def _delivery(row: tuple[Any, ...]) -> Queued:
    """A Queued from (seq, topic, payload, qos, retain, properties, expires_at, subscription_ids,
    share, packet_id)."""
    seq, topic, payload, qos, retain, properties, expires_at, ids, share, _ = row
    message = _message(topic, payload, qos, retain, properties, expires_at)
    ids, share = json.loads(ids), json.loads(share) if share else None
    if not (isinstance(ids, list) and all(type(i) is int for i in ids)) or not (
            share is None or (isinstance(share, list) and len(share) == 2 and all(type(s) is str for s in share))):
        raise ValueError(f"a queued message's subscription ids or share group: {row[7]!r}, {row[8]!r}")
    return Queued(message, qos, bool(retain), tuple(ids), tuple(share) if share else None,  # type: ignore[arg-type]
                  seq)


def _tables(db: sqlite3.Connection) -> dict[str, dict[str, tuple[str, bool]]]:
    """Each table's columns: (declared type, whether NULL is refused)."""
    names = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                          "AND name NOT LIKE 'sqlite_%'")]
    return {name: {column: (kind.upper(), bool(not_null or key))
                   for _, column, kind, not_null, _, key in db.execute(f'PRAGMA table_info("{name}")')}
            for name in names}


def _schema_tables() -> dict[str, dict[str, tuple[str, bool]]]:
    db = sqlite3.connect(":memory:")
    try:
        db.executescript(SCHEMA)
        return _tables(db)
    finally:
        db.close()


_OURS = _schema_tables()
"""This release's tables, and their columns."""


def _not_ours(db: sqlite3.Connection, path: Path) -> str | None:
    """Why the database at ``path`` is not to be opened (another program's, a later release's),
    read without writing; None if it is this broker's, or empty."""
    application = db.execute("PRAGMA application_id").fetchone()[0]
    if application != APPLICATION_ID and (application != 0 or any(
            name not in _OURS or not set(columns) <= set(_OURS[name]) for name, columns in _tables(db).items())):
        return f"{path} is not a database of mqtt_broker (another program's?): give the broker a data_dir of its own"
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > VERSION:
        return (f"{path} was written by a later release of mqtt_broker (its schema {version}, this release's "
                f"{VERSION}): start that release, or an empty store")
    return None


_SQLITE_TYPES = {"INTEGER": "'integer'", "REAL": "'real', 'integer'", "TEXT": "'text'", "BLOB": "'blob'"}
"""What ``typeof`` may say of a value of each declared type (SQLite stores any type in any column)."""


def _check_types(db: sqlite3.Connection) -> None:
    """Every value of this broker's tables (those there are: an older release's may have fewer)
    is of its column's type: a damaged row is refused here, not met as a TypeError by whatever
    reads it."""
    for name, columns in _tables(db).items():
        wrong = " OR ".join(f"typeof({column}) NOT IN ({_SQLITE_TYPES[kind]}{'' if required else ', ' + repr('null')})"
                            for column, (kind, required) in _OURS[name].items() if column in columns)
        found = db.execute(f"SELECT rowid FROM {name} WHERE {wrong} LIMIT 1").fetchone()
        if found is not None:
            raise sqlite3.DatabaseError(f"damaged: a row of {name} holds a value not of its column's type")


class SQLiteStore:
    """``SQLiteStore(path, reactor, synchronous="normal")``; see docs/durability.md for what each
    ``synchronous`` setting promises."""

    def __init__(self, path: str | Path, reactor: Any, synchronous: str = "normal") -> None:
        self.path = Path(path)
        self.reactor = reactor
        self.synchronous = synchronous.upper()
        self._db: sqlite3.Connection | None = None
        self._lock: int | None = None
        """The descriptor of the lock file held while the database is open (one broker a file)."""
        self._closing = False
        """Between ``close()`` and the end of its last write: the file may not be opened again."""
        self._pool: ThreadPool | None = None
        self._pending: list[tuple[str, tuple[Any, ...]] | None] = []
        self._waiters: list[Deferred[None]] = []
        self._inserts: dict[tuple[str, int], int] = {}
        """Deliveries inserted by the pending batch: (client id, seq) -> index in _pending."""
        self._pubrels: dict[tuple[str, int], int] = {}
        self._retained: dict[str, int] = {}
        """The retained message each topic's latest change sets (or deletes): topic -> index in
        _pending. The one before is dropped, so that a topic set at every PUBLISH while the disk
        is slow waits once."""
        self.unwritten_bytes = 0
        """What the changes recorded and not yet written hold (pending, being written, or of a
        batch that failed): CHANGE_BYTES and its payload each. Past ``max_unwritten_bytes``,
        the broker reads no more from a client whose packets add to it until ``flushed()``."""
        self.max_unwritten_bytes = MAX_UNWRITTEN_BYTES
        self._batch_bytes = 0
        """What the batch being written counts in ``unwritten_bytes``."""
        self._scheduled = False
        self._writing = False
        self._failing = False
        self._unwritten: list[tuple[str, tuple[Any, ...]]] = []
        """The statements of a batch that failed, written first in the next one."""
        self._retry_call: Any = None
        """Writes a failed batch again after RETRY_AFTER, with what came meanwhile."""
        self._batch_started = 0.0
        self.generation = 0
        self.gather: Callable[..., None] = call
        self.commit_observers: list[Callable[[float], None]] = []
        """Called on the reactor thread with the seconds each batch took, from being handed to the
        writer thread to its commit (the admin metrics observe them)."""

    # --- opening and reading ------------------------------------------------------------

    @property
    def opened(self) -> bool:
        """Whether ``load`` has opened the database: nothing can be written before."""
        return self._db is not None

    def load(self, window: int = 0, max_bytes: int = 0) -> Snapshot:
        if self._closing:
            # (Opened again now, it would not read the last changes, still being written, and the
            # close would end the new connection instead of the old one.)
            raise StoreError(f"{self.path} is still being closed: start again once the stop has finished "
                             f"(stopService's Deferred has fired)")
        if self._pending or self._waiters:  # (recorded while it was closed, its flush not come yet)
            self._drop_recorded_while_closed()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot use the data directory {self.path.parent}: {e.strerror or e}") from None
        self._take_lock()
        try:
            db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            # Nothing is written before the file is known to be this broker's, and sound.
            refusal = _not_ours(db, self.path)
            if refusal is not None:
                self._release_lock()
                db.close()
                raise StoreError(refusal)
            problems = [row[0] for row in db.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("damaged: " + "; ".join(problems[:3]))
            _check_types(db)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.synchronous}")
            db.executescript(SCHEMA)
            for table in ("history", "retained"):
                if "sender" not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
                    # (A database of 0.1.0: No Local needs the sender of a message logged or
                    # retained, a bridge's that came back to it the most.)
                    db.execute(f"ALTER TABLE {table} ADD COLUMN sender TEXT")
            db.execute(f"PRAGMA user_version = {VERSION}")
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            snapshot = self._read(db, window, max_bytes)
        except (sqlite3.Error, OSError, ValueError, MQTTError) as e:  # (MQTTError: a damaged properties blob)
            self._release_lock()
            name = getattr(e, "sqlite_errorname", "") or ""
            if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
                raise StoreError(f"cannot use the database {self.path}: {e}: another program holds it (a sqlite3 "
                                 f"shell, a backup): close it and start again") from None
            if name.startswith(_CANNOT_WRITE) or isinstance(e, OSError):
                raise StoreError(f"cannot use the database {self.path}: {e}: can its disk be written (read-only, "
                                 f"or full)?") from None
            raise StoreError(
                f"cannot use the database {self.path}: {e}. If it is damaged, move it (and its "
                f"-wal and -shm files) away to start with an empty store, or restore a backup; "
                f"`sqlite3 {self.path} .recover` may save what is in it.") from None
        self._db = db
        self._pool = ThreadPool(1, 1, name="mqtt-store")
        self._pool.start()
        return snapshot

    def _take_lock(self) -> None:
        """One broker a database: a second (a service restarted over a running one) would write
        the same rows, each over the other's (flock: a second store in this process is refused too)."""
        lock = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(f"cannot use the data directory {self.path.parent}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StoreError(f"{self.path} is in use by another broker (process {holder}): one broker a data "
                             f"directory") from None
        self._lock = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as e:
            self._release_lock()
            raise StoreError(f"cannot use the data directory {self.path.parent}: {e.strerror or e}: can its disk "
                             f"be written (read-only, or full)?") from None

    def _release_lock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # (which releases the flock)
            self._lock = None

    def _read(self, db: sqlite3.Connection, window: int, max_bytes: int) -> Snapshot:
        sessions: dict[str, tuple[Session, float | None]] = {}
        for client_id, expiry, disconnected_at, next_seq in db.execute(
                "SELECT client_id, expiry, disconnected_at, next_seq FROM sessions"):
            session = Session(client_id, expiry)
            session.stored = True
            session.next_seq = next_seq
            sessions[client_id] = (session, disconnected_at)
        for row in db.execute("SELECT client_id, topic_filter, qos, no_local, retain_as_published, "
                              "retain_handling, subscription_id, share_group FROM subscriptions"):
            if row[0] in sessions:
                sessions[row[0]][0].subscribe(Subscription(
                    client_id=row[0], topic_filter=row[1], qos=row[2], no_local=bool(row[3]),
                    retain_as_published=bool(row[4]), retain_handling=row[5], subscription_id=row[6],
                    share_group=row[7]))
        # In-flight messages all; queued ones up to the window (and max_bytes) per session, the
        # rest counted.
        bounds = ([f"rank <= {int(window)}"] if window else []) + (
            [f"(rank = 1 OR running <= {int(max_bytes)})"] if max_bytes else [])
        limit = f" WHERE packet_id IS NOT NULL OR ({' AND '.join(bounds)})" if bounds else ""
        for row in db.execute(
                "SELECT * FROM (SELECT client_id, seq, topic, payload, qos, retain, properties, expires_at, "
                "subscription_ids, share, packet_id, released, ROW_NUMBER() OVER queue AS rank, "
                "SUM(LENGTH(payload)) OVER queue AS running FROM deliveries "
                "WINDOW queue AS (PARTITION BY client_id, packet_id IS NULL ORDER BY seq))" + limit +
                " ORDER BY client_id, seq"):
            if row[0] not in sessions:
                continue
            session = sessions[row[0]][0]
            item = _delivery(row[1:11])
            if row[10] is None:
                session.push(item)
                session.loaded_seq = item.seq
            else:
                session.track(row[10], Outgoing(item.message, item.qos, item.retain, item.subscription_ids,
                                                item.share, item.seq, released=bool(row[11])))
        for client_id, queued, last_seq in db.execute(
                "SELECT client_id, SUM(packet_id IS NULL), MAX(seq) FROM deliveries GROUP BY client_id"):
            if client_id in sessions:
                session = sessions[client_id][0]
                session.spilled = queued - len(session.queue)
                session.next_seq = max(session.next_seq, last_seq + 1)
        for client_id, packet_id in db.execute("SELECT client_id, packet_id FROM awaiting_pubrel"):
            if client_id in sessions:
                sessions[client_id][0].expect_pubrel(packet_id)
        retained = [_message(topic, payload, qos, True, properties, expires_at, sender) for topic, payload, qos,
                    properties, expires_at, sender in db.execute(
                        "SELECT topic, payload, qos, properties, expires_at, sender FROM retained")]
        wills = []
        for client_id, username, topic, payload, qos, retain, properties, expires_at, due in db.execute(
                "SELECT client_id, username, topic, payload, qos, retain, properties, expires_at, due FROM wills"):
            message = _message(topic, payload, qos, retain, properties, expires_at)
            message.sender = client_id
            wills.append(StoredWill(client_id, username, message, due))
        history = [Entry(seq, _message(topic, payload, qos, False, properties, expires_at, sender), at)
                   for seq, topic, payload, qos, properties, expires_at, at, sender in db.execute(
                       "SELECT seq, topic, payload, qos, properties, expires_at, at, sender FROM history "
                       "ORDER BY seq")]
        alive = db.execute("SELECT value FROM meta WHERE key = 'alive'").fetchone()
        return Snapshot(list(sessions.values()), retained, wills, history, alive[0] if alive else None)

    def load_queued(self, client_id: str, after_seq: int, limit: int, max_bytes: int = 0) -> Deferred[list[Queued]]:
        def read() -> list[Queued]:
            assert self._db is not None
            # (Row by row, as the cursor steps: the reading stops at the first past max_bytes.)
            return first_within(map(_delivery, self._db.execute(
                "SELECT seq, topic, payload, qos, retain, properties, expires_at, subscription_ids, share, "
                "packet_id FROM deliveries WHERE client_id = ? AND seq > ? AND packet_id IS NULL "
                "ORDER BY seq LIMIT ?", (client_id, after_seq, limit))), limit, max_bytes)
        return self._once_written(read)

    def _once_written(self, work: Callable[[], _T]) -> Deferred[_T]:
        """``work`` on the writer thread, once everything recorded so far is written."""
        def written(_: None) -> Deferred[_T]:
            assert self._pool is not None
            return deferToThreadPool(self.reactor, self._pool, work)
        return self.flushed().addCallback(written)

    def drop_expired(self, client_id: str, after_seq: int, now: float) -> Deferred[int]:
        """Delete the queued messages of a session numbered after ``after_seq`` that expired by
        ``now``; fires with how many. Everything recorded before the call is included."""
        def delete() -> int:
            assert self._db is not None
            return self._db.execute(
                "DELETE FROM deliveries WHERE client_id = ? AND seq > ? AND packet_id IS NULL "
                "AND expires_at <= ?", (client_id, after_seq, now)).rowcount
        return self._once_written(delete)

    # --- recording changes --------------------------------------------------------------

    def _record(self, sql: str, args: tuple[Any, ...], payload: int = 0) -> int:
        """Add a statement to the pending batch (``payload``: the length of the payload it
        holds); returns its index there."""
        self._pending.append((sql, args))
        self.unwritten_bytes += CHANGE_BYTES + payload
        if not self._scheduled and not self._writing:
            self._schedule()
        return len(self._pending) - 1

    def _schedule(self) -> None:
        """Write what waits at the next turn of the reactor; while writes fail, RETRY_AFTER after
        the last failure only: each write goes through the whole backlog (compacted first, on the
        reactor thread), which must not be once per change, nor one failure after the other."""
        self._scheduled = True
        if self._failing:
            self._retry_call = self.reactor.callLater(RETRY_AFTER, self._retry)
        else:
            self.reactor.callLater(0, self._flush)

    def _drop(self, index: int) -> None:
        """Take the statement at ``index`` out of the pending batch."""
        statement = self._pending[index]
        assert statement is not None
        self._pending[index] = None
        self.unwritten_bytes -= _size(statement)

    def _record_retained(self, topic: str, sql: str, args: tuple[Any, ...], payload: int = 0) -> None:
        earlier = self._retained.get(topic)
        if earlier is not None:
            self._drop(earlier)
        self._retained[topic] = self._record(sql, args, payload)

    def alive(self, now: float) -> None:
        """The broker is alive at clock time ``now`` (kept for the sessions its next start takes
        up, if it is killed)."""
        self._record(_ALIVE, (now,))

    def save_session(self, session: Session, disconnected_at: float | None) -> None:
        self._record(_SAVE_SESSION, (session.client_id, session.expiry, disconnected_at, session.next_seq))

    def delete_session(self, client_id: str) -> None:
        for table in ("sessions", "subscriptions", "deliveries", "awaiting_pubrel"):
            self._record(f"DELETE FROM {table} WHERE client_id = ?", (client_id,))

    def save_subscription(self, client_id: str, s: Subscription) -> None:
        self._record(_SAVE_SUBSCRIPTION, (client_id, s.topic_filter, s.qos, s.no_local, s.retain_as_published,
                                          s.retain_handling, s.subscription_id, s.share_group))

    def delete_subscription(self, client_id: str, topic_filter: str) -> None:
        self._record(_DELETE_SUBSCRIPTION, (client_id, topic_filter))

    def save_retained(self, message: Message) -> None:
        self._record_retained(message.topic, _SAVE_RETAINED, (
            message.topic, message.payload, message.qos, _props(message), message.expires_at, message.sender),
            len(message.payload))

    def delete_retained(self, topic: str) -> None:
        self._record_retained(topic, _DELETE_RETAINED, (topic,))

    def add_delivery(self, client_id: str, item: Queued, packet_id: int | None) -> None:
        m = item.message
        index = self._record(_INSERT_DELIVERY, (
            client_id, item.seq, m.topic, m.payload, item.qos, item.retain, _props(m), m.expires_at,
            json.dumps(item.subscription_ids), json.dumps(item.share) if item.share else None, packet_id, 0),
            len(m.payload))
        self._inserts[(client_id, item.seq)] = index

    def update_delivery(self, client_id: str, seq: int, packet_id: int, released: bool) -> None:
        index = self._inserts.get((client_id, seq))
        if index is not None:  # still in the pending batch: change the insert itself
            sql, args = self._pending[index]  # type: ignore[misc]
            self._pending[index] = (sql, (*args[:10], packet_id, int(released)))
            return
        self._record(_UPDATE_DELIVERY, (packet_id, released, client_id, seq))

    def remove_delivery(self, client_id: str, seq: int) -> None:
        index = self._inserts.pop((client_id, seq), None)
        if index is not None:  # never written: nothing to delete
            self._drop(index)
            return
        self._record(_DELETE_DELIVERY, (client_id, seq))

    def add_pubrel(self, client_id: str, packet_id: int) -> None:
        index = self._record(_INSERT_PUBREL, (client_id, packet_id))
        self._pubrels[(client_id, packet_id)] = index

    def remove_pubrel(self, client_id: str, packet_id: int) -> None:
        index = self._pubrels.pop((client_id, packet_id), None)
        if index is not None:
            self._drop(index)
            return
        self._record(_DELETE_PUBREL, (client_id, packet_id))

    def save_will(self, will: StoredWill) -> None:
        m = will.message
        self._record(_SAVE_WILL, (will.client_id, will.username, m.topic, m.payload, m.qos, m.retain, _props(m),
                                  m.expires_at, will.due), len(m.payload))

    def save_history(self, entry: Entry) -> None:
        m = entry.message
        self._record(_SAVE_HISTORY, (entry.seq, m.topic, m.payload, m.qos, _props(m), m.expires_at, entry.at,
                                     m.sender), len(m.payload))

    def forget_history(self, before_seq: int) -> None:
        self._record(_FORGET_HISTORY, (before_seq,))

    def drop_history(self, seqs: list[int]) -> None:
        for seq in seqs:
            self._record(_DROP_HISTORY, (seq,))

    def delete_will(self, client_id: str) -> None:
        self._record(_DELETE_WILL, (client_id,))

    # --- writing ------------------------------------------------------------------------

    def flushed(self) -> Deferred[None]:
        if not self._pending and not self._writing and not self._waiters and not self._unwritten:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        if not self._scheduled and not self._writing:
            self._schedule()
        return d

    def _flush(self) -> None:
        self._scheduled = False
        if self._writing:
            return
        if self._pool is None:
            self._drop_recorded_while_closed()
            return
        # What a failed batch held goes first: it is written once the disk works again.
        batch = [op for op in self._pending if op is not None]
        if self._unwritten:
            batch, self._unwritten = compacted(self._unwritten + batch), []
            self.unwritten_bytes = sum(map(_size, batch))  # (what compacting left)
        self._batch_bytes = self.unwritten_bytes
        self.generation += 1
        waiters = self._waiters
        self._pending, self._waiters = [], []
        self._inserts.clear()
        self._pubrels.clear()
        self._retained.clear()
        if not batch:
            self.gather(fire, waiters)
            return
        self._writing = True
        self._batch_started = time.perf_counter()
        assert self._pool is not None
        deferToThreadPool(self.reactor, self._pool, self._write, batch).addBoth(self._written, waiters, batch)

    def _write(self, batch: list[tuple[str, tuple[Any, ...]]]) -> list[tuple[str, Exception]]:
        """Write ``batch`` in one transaction; returns the statements sqlite3 refused (_REFUSED),
        left out of it, with why."""
        db = self._db
        assert db is not None
        refused: list[tuple[str, Exception]] = []
        try:
            db.execute("BEGIN")
            for sql, args in batch:
                try:
                    db.execute(sql, args)
                except _REFUSED as e:  # (the statement alone is undone: the transaction goes on)
                    refused.append((sql, e))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return refused

    def _written(self, result: Any, waiters: list[Deferred[None]], batch: list[tuple[str, tuple[Any, ...]]]) -> None:
        self._writing = False
        if self.commit_observers and not isinstance(result, Failure):
            elapsed = time.perf_counter() - self._batch_started
            for observe in self.commit_observers:
                observe(elapsed)
        if isinstance(result, Failure):
            if not self._failing:
                self._failing = True
                log.failure("cannot write to {path}; QoS 1/2 messages are not acknowledged until it works again",
                            result, path=str(self.path))
            error = StoreError(f"write to {self.path} failed: {result.getErrorMessage()}")
            self._unwritten = batch
            self._schedule()  # (before the waiters hear, who may wait again)
            self.gather(fire, waiters, error)
            return
        self.unwritten_bytes -= self._batch_bytes
        for sql, error in result:
            log.error("{path} cannot take a change, dropped ({statement}): {error}", path=str(self.path),
                      statement=sql.split(" (", 1)[0], error=error)
        if self._failing:
            self._failing = False
            log.info("writing to {path} works again", path=str(self.path))
        self.gather(fire, waiters)
        if self._pending or self._waiters:
            self._flush()

    def _retry(self) -> None:
        self._retry_call = None
        self._flush()

    def _drop_recorded_while_closed(self) -> None:
        """What was recorded while the store was closed is not written (opened again, the store's
        state was read without it), and said so; whoever waits for it is told."""
        lost = [op for op in self._pending if op is not None]
        if lost:
            log.error("{count} changes recorded after {path} was closed are lost", count=len(lost),
                      path=str(self.path))
        self._pending, self._inserts, self._pubrels, self._retained = [], {}, {}, {}
        self.unwritten_bytes = 0
        self.generation += 1
        waiters, self._waiters = self._waiters, []
        self.gather(fire, waiters, StoreError(f"{self.path} is closed"))

    def close(self) -> Deferred[None]:
        """Write what is pending, then close the file and stop the writer thread."""
        def closed(_: Any) -> None:
            self._closing = False
            if self._unwritten:  # (written, or failed again, by the flush this close waited for)
                log.error("closing {path} with {count} changes not written: the disk failed, and they are lost",
                          path=str(self.path), count=len(self._unwritten))
                self.unwritten_bytes -= sum(map(_size, self._unwritten))
                self._unwritten = []
            # Opened again, the store starts afresh: a failing disk is logged anew, a working one
            # is not said to work "again".
            self._failing = False
            if self._retry_call is not None:
                self._retry_call.cancel()
                self._retry_call = None
                self._scheduled = False
            if self._pool is not None:
                self._pool.stop()
                self._pool = None
            if self._db is not None:
                self._db.close()
                self._db = None
            self._release_lock()
        self._closing = True
        d = self.flushed() if self._db is not None else succeed(None)
        return d.addBoth(closed)

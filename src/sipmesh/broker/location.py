"""The location service: bindings of contacts to addresses-of-record (RFC 3261 §10).

Bindings live in SQLite in WAL mode, so that every worker process of a broker reads
the same store, readers never wait for a writer, and a committed registration
survives the broker being killed (WAL with synchronous=NORMAL loses nothing on a
process crash; only a power cut can roll back the last transactions). Writers are
serialised with a flock() on a lock file beside the database: the kernel wakes a
waiting worker the moment the lock is free, where SQLite's own busy handler would
put a whole event loop to sleep for milliseconds.

Expiry times are wall-clock (time.time()) because they must mean the same thing
after a restart.

Checkpoints (copying the WAL back into the database, with an fsync) can take
hundreds of milliseconds on a slow disk. SQLite runs them inside the COMMIT that
fills the WAL, which would stall that worker, and every worker waiting for the
write lock behind it. A broker therefore opens the store with
`auto_checkpoint=False` and calls `checkpoint()` from a thread of its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, TypeVar

from sipmesh.sip.transport.base import Flow

T = TypeVar("T")
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS bindings (
    aor         TEXT NOT NULL,
    contact_key TEXT NOT NULL,   -- the contact URI normalised for comparison (§19.1.4)
    contact     TEXT NOT NULL,   -- the contact URI as registered
    expires     REAL NOT NULL,   -- absolute, time.time()
    q           REAL NOT NULL,
    call_id     TEXT NOT NULL,
    cseq        INTEGER NOT NULL,
    transport   TEXT,            -- where the REGISTER really came from (received/rport)
    src_host    TEXT,
    src_port    INTEGER,
    worker      INTEGER NOT NULL DEFAULT 0,  -- the worker holding that flow (TCP/TLS)
    user_agent  TEXT,
    updated     REAL NOT NULL,
    via         TEXT,            -- digest of the REGISTER's top Via: spots its retransmissions
    nat         INTEGER NOT NULL DEFAULT 0,  -- sent from behind NAT: reach it at the source
    PRIMARY KEY (aor, contact_key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS bindings_by_expiry ON bindings (expires);
CREATE TABLE IF NOT EXISTS aors (
    aor             TEXT PRIMARY KEY,
    last_registered REAL NOT NULL   -- 404 for AORs never seen, 480 for known ones
) WITHOUT ROWID;
"""
_COLUMNS = ("aor, contact_key, contact, expires, q, call_id, cseq, transport, src_host, src_port, "
            "worker, user_agent, updated, via, nat")


class Binding(NamedTuple):
    """One contact bound to an AOR. A tuple in the column order of the table, so that
    rows become bindings and bindings rows without any copying."""

    aor: str
    contact_key: str
    contact: str
    expires: float
    q: float
    call_id: str
    cseq: int
    transport: str | None = None
    src_host: str | None = None
    src_port: int | None = None
    worker: int = 0
    user_agent: str | None = None
    updated: float = 0.0
    via: str | None = None
    nat: bool = False  # the REGISTER came through a NAT: requests go to `source`

    @property
    def source(self) -> Flow | None:
        """The flow the REGISTER really arrived on (received/rport)."""
        if self.transport is None or self.src_host is None or self.src_port is None:
            return None
        return Flow(self.transport, self.src_host, self.src_port)

    def remaining(self, now: float) -> int:
        return max(0, int(self.expires - now + 0.5))


@dataclass(frozen=True, slots=True)
class Changes:
    """What one REGISTER does to one AOR's bindings (all or nothing, §10.3 step 8)."""

    upsert: tuple[Binding, ...] = ()
    delete: tuple[str, ...] = ()  # contact keys
    delete_all: bool = False

    @property
    def empty(self) -> bool:
        return not (self.upsert or self.delete or self.delete_all)


def default_db_path() -> Path:
    """$XDG_STATE_HOME/sipmesh/broker.db, else ~/.local/state/sipmesh/broker.db."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "sipmesh" / "broker.db"


class SqliteStore:
    """One SQLite database shared by processes: WAL, and writers serialised with a
    flock() on `PATH.lock` (see the module's docstring). The location service and the
    networks (broker/networks.py) are two stores on the same file and the same lock."""

    def __init__(self, path: str | os.PathLike[str], *, auto_checkpoint: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._checkpointer: sqlite3.Connection | None = None  # checkpoint()'s own connection
        self._lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0,
                                   check_same_thread=False, cached_statements=64)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self.setup_schema(self._db)
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        except BaseException:
            self.close()
            raise
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA temp_store=MEMORY")
        if not auto_checkpoint:
            self._db.execute("PRAGMA wal_autocheckpoint=0")
        try:
            os.chmod(self.path, 0o600)
        except OSError:
            pass

    def setup_schema(self, db: sqlite3.Connection) -> None:
        """Create or check the schema (called once, under the write lock)."""

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        if self._checkpointer is not None:
            with contextlib.suppress(sqlite3.Error):
                self._checkpointer.close()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    @contextlib.contextmanager
    def writing(self) -> Iterator[sqlite3.Connection]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (disk full, I/O error) may leave the transaction open:
                # end it, or every later write would fail too.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)


class LocationService(SqliteStore):
    """Bindings per AOR in one SQLite database; safe to open from several processes."""

    def __init__(self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time,
                 known_retention: float = 30 * 86400.0, auto_checkpoint: bool = True) -> None:
        self.clock = clock
        self.known_retention = known_retention
        super().__init__(path, auto_checkpoint=auto_checkpoint)

    def setup_schema(self, db: sqlite3.Connection) -> None:
        db.executescript(_SCHEMA)  # in its own transaction
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        elif version != SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: location database version {version}, this broker "
                               f"knows {SCHEMA_VERSION}: move the file away and let it be recreated")

    # -- writing ------------------------------------------------------------------------
    def update(self, aor: str, decide: Callable[[list[Binding]], tuple[T, Changes]]) -> T:
        """Read `aor`'s live bindings, let `decide` return (result, changes), apply the
        changes, commit; all under the write lock so concurrent REGISTERs serialise."""
        result = self.update_many([(aor, decide)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def update_many(self, items: list[tuple[str, Callable[[list[Binding]], tuple[T, Changes]]]]) -> list[T | Exception]:
        """Several `update`s in one transaction: one commit for a burst of REGISTERs.

        Each `decide` sees the bindings as the items before it left them. An exception
        raised by a `decide` is returned in its place (nothing of that item is applied);
        a database error rolls everything back and is raised."""
        results: list[T | Exception] = []
        now = self.clock()
        with self.writing() as db:
            current = self._select_many({aor for aor, _ in items}, now)
            upserts: dict[tuple[str, str], Binding] = {}
            deletes: set[tuple[str, str]] = set()
            known: dict[str, bool] = {}  # aors whose "known" row must be written
            for aor, decide in items:
                bindings = current.get(aor, [])
                try:
                    result, changes = decide(bindings)
                except Exception as exc:  # noqa: BLE001 - handed back to the caller
                    results.append(exc)
                    continue
                results.append(result)
                if changes.empty:
                    continue
                gone = {b.contact_key for b in bindings} if changes.delete_all else set(changes.delete)
                for key in gone:
                    deletes.add((aor, key))
                    upserts.pop((aor, key), None)
                for binding in changes.upsert:
                    deletes.discard((aor, binding.contact_key))
                    upserts[(aor, binding.contact_key)] = binding
                if gone or not bindings:
                    known[aor] = True
                fresh = {b.contact_key for b in changes.upsert}
                current[aor] = [b for b in bindings if b.contact_key not in gone and b.contact_key not in fresh]
                current[aor] += changes.upsert
            if deletes:
                db.executemany("DELETE FROM bindings WHERE aor=? AND contact_key=?", sorted(deletes))
            if upserts:
                db.executemany(f"INSERT OR REPLACE INTO bindings ({_COLUMNS}) VALUES "
                               "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", list(upserts.values()))
            if known:
                # "known since" matters once no binding is left; purge() refreshes it on expiry
                db.executemany("INSERT OR REPLACE INTO aors (aor, last_registered) VALUES (?, ?)",
                               [(aor, now) for aor in known])
        return results

    def _select_many(self, aors: set[str], now: float) -> dict[str, list[Binding]]:
        found: dict[str, list[Binding]] = {}
        names = list(aors)
        for i in range(0, len(names), 500):  # SQLite allows 999 parameters per statement
            chunk = names[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._db.execute(f"SELECT {_COLUMNS} FROM bindings WHERE aor IN ({marks}) "
                                        "AND expires > ? ORDER BY q DESC, updated DESC", (*chunk, now)):
                found.setdefault(row[0], []).append(Binding(*row))
        return found

    def purge(self) -> int:
        """Delete expired bindings (and AORs not registered for `known_retention`)."""
        now = self.clock()
        with self.writing() as db:
            db.execute("UPDATE aors SET last_registered=? WHERE aor IN "
                       "(SELECT aor FROM bindings WHERE expires <= ?)", (now, now))
            count = db.execute("DELETE FROM bindings WHERE expires <= ?", (now,)).rowcount
            db.execute("DELETE FROM aors WHERE last_registered < ?", (now - self.known_retention,))
        return count

    def clear(self) -> None:
        with self.writing() as db:
            db.execute("DELETE FROM bindings")
            db.execute("DELETE FROM aors")

    def checkpoint(self) -> int:
        """Copy what the WAL holds into the database (PASSIVE: writers go on meanwhile);
        the number of WAL frames now in the database. Safe to call from another thread
        than the one using the store, one thread at a time."""
        if self._checkpointer is None:
            self._checkpointer = sqlite3.connect(self.path, isolation_level=None, timeout=30.0,
                                                 check_same_thread=False)
        busy, _, done = self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return 0 if busy else done

    # -- reading ------------------------------------------------------------------------
    def _select(self, aor: str, now: float) -> list[Binding]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM bindings WHERE aor=? AND expires > ? "
                                "ORDER BY q DESC, updated DESC", (aor, now)).fetchall()
        return [Binding(*row) for row in rows]

    def lookup(self, aor: str) -> list[Binding]:
        """The live bindings of `aor`, highest q first (most recently refreshed first on ties)."""
        return self._select(aor, self.clock())

    def known(self, aor: str) -> bool:
        """Has `aor` ever registered (within `known_retention`)?"""
        return self._db.execute("SELECT 1 FROM aors WHERE aor=?", (aor,)).fetchone() is not None

    def count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM bindings WHERE expires > ?",
                                (self.clock(),)).fetchone()[0]

    def all(self, limit: int = -1) -> list[Binding]:
        """The live bindings by AOR (the first `limit` of them; -1: every one)."""
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM bindings WHERE expires > ? ORDER BY aor, q DESC "
                                "LIMIT ?", (self.clock(), limit)).fetchall()
        return [Binding(*row) for row in rows]

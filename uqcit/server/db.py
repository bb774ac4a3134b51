"""The server's records in SQLite: jobs and API keys, one database file in the data folder.

The schema is created and migrated by the server (``open_db``): ``schema_version`` holds one row
per applied migration, ``MIGRATIONS`` lists them in order, and a database written by a newer
server is refused rather than misread. Every process (the server, each job process) opens its
own connection; WAL mode lets a job write its progress while the server reads.

State changes are conditional updates (``... WHERE state = 'running' AND run_token = ?``): a job
process whose run was cancelled, or declared interrupted by a restarted server, can no longer
write its outcome over that decision.

>>> import tempfile, pathlib
>>> store = JobStore(pathlib.Path(tempfile.mkdtemp()) / "jobs.sqlite3")
>>> job = store.add(model="tiny-llama", recipe_json="{}", recipe_name="r", options={"quick": 1},
...                 stages=["load", "quantize"])
>>> store.get(job.id).state, store.claim_next().id == job.id, store.get(job.id).state
('queued', True, 'running')
"""
from __future__ import annotations

import dataclasses
import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

DB_FILE = "uqcit-server.sqlite3"
STATES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running")

# (version, statements); append only: a released migration is never edited.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1, (
        """CREATE TABLE api_keys (
               id INTEGER PRIMARY KEY, name TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE,
               prefix TEXT NOT NULL, created_at REAL NOT NULL, revoked_at REAL)""",
        """CREATE TABLE jobs (
               id TEXT PRIMARY KEY, state TEXT NOT NULL, model TEXT NOT NULL,
               recipe_name TEXT NOT NULL, recipe_json TEXT NOT NULL, options_json TEXT NOT NULL,
               stages_json TEXT NOT NULL, stage TEXT, stages_done INTEGER NOT NULL DEFAULT 0,
               created_at REAL NOT NULL, started_at REAL, finished_at REAL,
               error TEXT, report_json TEXT, run_token TEXT, pid INTEGER)""",
        "CREATE INDEX jobs_by_state ON jobs (state, created_at)",
    )),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


class SchemaError(RuntimeError):
    """A database this server cannot use (written by a newer version); the message says what to do."""


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) that waits on a busy database."""
    con = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    con.row_factory = sqlite3.Row
    con.execute("PRAGMA busy_timeout = 30000")
    return con


def schema_version(con: sqlite3.Connection) -> int:
    """The highest applied migration; 0 for a new database."""
    has = con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone()
    if not has:
        return 0
    row = con.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return row[0] or 0


def open_db(path: str | Path) -> sqlite3.Connection:
    """Open (creating and migrating as needed) the server database at ``path``."""
    con = connect(path)
    con.execute("PRAGMA journal_mode = WAL")  # readers never wait for a job writing its progress
    con.execute("BEGIN IMMEDIATE")
    try:
        con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at REAL NOT NULL)")
        current = schema_version(con)
        if current > SCHEMA_VERSION:
            raise SchemaError(f"{path}: database schema version {current} is newer than this server's "
                              f"({SCHEMA_VERSION}); upgrade uqcit, or start the server on another --data folder")
        for version, statements in MIGRATIONS:
            if version > current:
                for statement in statements:
                    con.execute(statement)
                con.execute("INSERT INTO schema_version VALUES (?, ?)", (version, time.time()))
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        con.close()
        raise
    return con


@dataclasses.dataclass(frozen=True)
class JobRecord:
    """One job as stored: what was asked, where it stands, and its outcome."""

    id: str
    state: str  # one of STATES
    model: str  # as the client named it
    recipe_name: str
    recipe_json: str
    options: dict[str, Any]  # quick/sign/encrypt/encode; never a secret
    stages: list[str]  # the steps progress counts: load, each recipe stage, package
    stage: str | None  # the step running now (or the last one reached)
    stages_done: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    report_json: str | None
    run_token: str | None
    pid: int | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "JobRecord":
        d = dict(row)
        d["options"] = json.loads(d.pop("options_json"))
        d["stages"] = json.loads(d.pop("stages_json"))
        return cls(**d)

    @property
    def progress(self) -> float:
        """Fraction of the steps done, in [0, 1]."""
        return 1.0 if self.state == "succeeded" else self.stages_done / max(len(self.stages), 1)


class JobStore:
    """Jobs and API keys in the database at ``path`` (created and migrated on first open)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._con = open_db(self.path)
        self._lock = threading.Lock()  # one connection, shared by the server's threads: one statement at a time

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def _rows(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._con.execute(sql, args).fetchall()

    def _one(self, sql: str, args: tuple = ()) -> sqlite3.Row | None:
        rows = self._rows(sql, args)
        return rows[0] if rows else None

    def _change(self, sql: str, args: tuple = ()) -> int:
        """Run an update; the number of rows it changed."""
        with self._lock:
            return self._con.execute(sql, args).rowcount

    # ------------------------------------------------------------------ jobs

    def add(self, *, model: str, recipe_json: str, recipe_name: str, options: dict[str, Any],
            stages: list[str]) -> JobRecord:
        """Record a new queued job; returns it."""
        job_id = secrets.token_hex(16)
        self._change(
            "INSERT INTO jobs (id, state, model, recipe_name, recipe_json, options_json, stages_json, created_at)"
            " VALUES (?, 'queued', ?, ?, ?, ?, ?, ?)",
            (job_id, model, recipe_name, recipe_json, json.dumps(options), json.dumps(stages), time.time()))
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord | None:
        row = self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return None if row is None else JobRecord.from_row(row)

    def list(self, *, state: str | None = None, limit: int = 100) -> list[JobRecord]:
        """Newest first."""
        where, args = ("WHERE state = ?", (state,)) if state else ("", ())
        rows = self._rows(f"SELECT * FROM jobs {where} ORDER BY created_at DESC, rowid DESC LIMIT ?",
                          (*args, limit))
        return [JobRecord.from_row(r) for r in rows]

    def count(self, state: str) -> int:
        return self._one("SELECT COUNT(*) FROM jobs WHERE state = ?", (state,))[0]

    def claim_next(self) -> JobRecord | None:
        """Mark the oldest queued job running (with a fresh run token) and return it; None if none."""
        token = secrets.token_hex(8)
        row = self._one(
            "UPDATE jobs SET state = 'running', started_at = ?, run_token = ? WHERE id = "
            "(SELECT id FROM jobs WHERE state = 'queued' ORDER BY created_at, rowid LIMIT 1) RETURNING *",
            (time.time(), token))
        return None if row is None else JobRecord.from_row(row)

    def set_pid(self, job_id: str, token: str, pid: int) -> None:
        self._change("UPDATE jobs SET pid = ? WHERE id = ? AND run_token = ?", (pid, job_id, token))

    def progress(self, job_id: str, token: str, stage: str, stages_done: int) -> bool:
        """Record the step a running job has reached; False when the run is no longer current."""
        changed = self._change("UPDATE jobs SET stage = ?, stages_done = ? WHERE id = ? AND state = 'running' "
                               "AND run_token = ?", (stage, stages_done, job_id, token))
        return changed == 1

    def finish(self, job_id: str, token: str, state: str, *, error: str | None = None,
               report_json: str | None = None) -> bool:
        """End a running job's current run as ``state``; False when it was already decided otherwise."""
        if state not in ("succeeded", "failed"):
            raise ValueError(f"a run ends as 'succeeded' or 'failed', got {state!r}")
        done = "stages_done = json_array_length(stages_json), " if state == "succeeded" else ""
        changed = self._change(
            f"UPDATE jobs SET state = ?, {done}finished_at = ?, error = ?, report_json = ? "
            "WHERE id = ? AND state = 'running' AND run_token = ?",
            (state, time.time(), error, report_json, job_id, token))
        return changed == 1

    def cancel(self, job_id: str) -> bool:
        """Mark a queued or running job cancelled; False when it had already ended."""
        changed = self._change("UPDATE jobs SET state = 'cancelled', finished_at = ?, error = ? "
                               "WHERE id = ? AND state IN ('queued', 'running')",
                               (time.time(), "cancelled by a client", job_id))
        return changed == 1

    def fail_queued(self, job_id: str, reason: str) -> bool:
        """Fail a job before it runs (e.g. its secret did not survive a restart)."""
        changed = self._change("UPDATE jobs SET state = 'failed', finished_at = ?, error = ? "
                               "WHERE id = ? AND state = 'queued'", (time.time(), reason, job_id))
        return changed == 1

    def fail_running(self, reason: str) -> list[str]:
        """Fail every job marked running (the server that ran it is gone); returns their ids."""
        rows = self._rows("UPDATE jobs SET state = 'failed', finished_at = ?, error = ? "
                          "WHERE state = 'running' RETURNING id", (time.time(), reason))
        return [r[0] for r in rows]

    def queued(self) -> list[JobRecord]:
        """Queued jobs, oldest first."""
        return [JobRecord.from_row(r) for r in
                self._rows("SELECT * FROM jobs WHERE state = 'queued' ORDER BY created_at, rowid")]

    # ------------------------------------------------------------------ API keys

    def add_key(self, name: str, key_hash: str, prefix: str) -> int:
        row = self._one("INSERT INTO api_keys (name, key_hash, prefix, created_at) VALUES (?, ?, ?, ?) "
                        "RETURNING id", (name, key_hash, prefix, time.time()))
        return row[0]

    def key_id(self, key_hash: str) -> int | None:
        """The id of the live (not revoked) key with this hash, or None."""
        row = self._one("SELECT id FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL", (key_hash,))
        return None if row is None else row[0]

    def keys(self) -> list[dict[str, Any]]:
        rows = self._rows("SELECT id, name, prefix, created_at, revoked_at FROM api_keys ORDER BY id")
        return [dict(r) for r in rows]

    def revoke_key(self, key_id: int) -> bool:
        changed = self._change("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                               (time.time(), key_id))
        return changed == 1

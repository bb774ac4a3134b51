"""The server's SQLite records: schema creation and migration, and state changes that a stale run
cannot overwrite."""
from __future__ import annotations

import sqlite3

import pytest

from uqcit.server import db
from uqcit.server.auth import create_key, check_key


def _job(store):
    return store.add(model="tiny-llama", recipe_json="{}", recipe_name="r", options={}, stages=["load", "package"])


def test_a_new_database_gets_every_migration_once(tmp_path):
    path = tmp_path / "s.sqlite3"
    db.JobStore(path).close()
    db.JobStore(path).close()  # opening again applies nothing twice
    con = sqlite3.connect(path)
    assert [r[0] for r in con.execute("SELECT version FROM schema_version")] == [db.SCHEMA_VERSION]
    assert {"jobs", "api_keys"} <= {r[0] for r in con.execute("SELECT name FROM sqlite_master")}


def test_an_older_database_is_migrated(tmp_path, monkeypatch):
    path = tmp_path / "s.sqlite3"
    db.JobStore(path).close()
    extra = (db.SCHEMA_VERSION + 1, ("ALTER TABLE jobs ADD COLUMN note TEXT",))
    monkeypatch.setattr(db, "MIGRATIONS", db.MIGRATIONS + (extra,))
    monkeypatch.setattr(db, "SCHEMA_VERSION", extra[0])
    store = db.JobStore(path)
    assert db.schema_version(store._con) == extra[0]
    assert "note" in [r[1] for r in store._con.execute("PRAGMA table_info(jobs)")]


def test_a_newer_database_is_refused(tmp_path):
    path = tmp_path / "s.sqlite3"
    db.JobStore(path).close()
    con = sqlite3.connect(path)
    con.execute("INSERT INTO schema_version VALUES (?, 0)", (db.SCHEMA_VERSION + 1,))
    con.commit()
    with pytest.raises(db.SchemaError, match="newer than this server"):
        db.JobStore(path)


def test_a_cancelled_or_superseded_run_cannot_write_its_outcome(tmp_path):
    store = db.JobStore(tmp_path / "s.sqlite3")
    job = _job(store)
    run = store.claim_next()
    assert run.id == job.id and store.claim_next() is None
    assert store.progress(job.id, run.run_token, "load", 0)
    assert store.cancel(job.id)
    assert not store.progress(job.id, run.run_token, "package", 1)
    assert not store.finish(job.id, run.run_token, "succeeded", report_json="{}")
    assert store.get(job.id).state == "cancelled" and not store.cancel(job.id)

    other = _job(store)
    run = store.claim_next()
    assert store.fail_running("interrupted") == [other.id]
    assert not store.finish(other.id, run.run_token, "succeeded")
    assert store.get(other.id).error == "interrupted"


def test_jobs_are_claimed_oldest_first_and_progress_counts_steps(tmp_path):
    store = db.JobStore(tmp_path / "s.sqlite3")
    first, second = _job(store), _job(store)
    run = store.claim_next()
    assert run.id == first.id and store.get(second.id).state == "queued"
    store.progress(first.id, run.run_token, "package", 1)
    assert store.get(first.id).progress == 0.5
    assert store.finish(first.id, run.run_token, "succeeded")
    assert store.get(first.id).progress == 1.0 and store.get(first.id).stages_done == 2


def test_keys_are_stored_hashed_and_can_be_revoked(tmp_path):
    store = db.JobStore(tmp_path / "s.sqlite3")
    key_id, key = create_key(store, "ci")
    raw = tmp_path.joinpath("s.sqlite3").read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("s.sqlite3-*"))
    assert key.encode() not in raw  # only the hash is written
    assert check_key(store, key) == key_id
    assert store.revoke_key(key_id) and check_key(store, key) is None

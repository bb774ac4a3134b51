"""What the operator decides when starting a server: its data folder, model folders and limits.

Clients decide none of it: every path the server reads or writes on a client's request is in
``data`` (jobs, uploaded models) or, for models, in one of ``model_dirs``.

>>> s = ServerSettings(data=Path("/srv/uqcit"))
>>> s.db_path, s.job_dir("ab12")
(PosixPath('/srv/uqcit/uqcit-server.sqlite3'), PosixPath('/srv/uqcit/jobs/ab12'))
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from uqcit.server.db import DB_FILE

MiB = 1 << 20
PACKAGE_DIR = "package"  # a job's package, inside its folder
REPORT_FILE = "report.json"  # a job's report (the JSON of `uqcit compress --json`), beside it


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """A server's configuration (``uqcit serve`` options)."""

    data: Path  # the server's own folder: database, jobs and their packages, uploaded models
    model_dirs: tuple[Path, ...] = ()  # folders whose model sub-folders clients may name by path
    max_jobs: int = 1  # jobs run at once; more wait in the queue (compression is CPU- and memory-heavy)
    max_upload_bytes: int = 2048 * MiB  # a model upload's archive (and its unpacked files, together)
    max_request_bytes: int = 1 * MiB  # any other request body: a recipe is a few KiB
    sign_key: Path | None = None  # Ed25519 private key (PEM) that signs packages of jobs asking for it
    sign_key_passphrase_env: str | None = None  # environment variable with that key's passphrase
    job_threads: int | None = None  # torch threads per job; None: the cores shared among max_jobs

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data).absolute())
        object.__setattr__(self, "model_dirs", tuple(Path(d).resolve() for d in self.model_dirs))
        if self.max_jobs < 1:
            raise ValueError(f"max_jobs must be >= 1, got {self.max_jobs}")
        if self.max_upload_bytes < 1 or self.max_request_bytes < 1:
            raise ValueError("size limits must be >= 1 byte")

    @property
    def db_path(self) -> Path:
        return self.data / DB_FILE

    @property
    def jobs_dir(self) -> Path:
        return self.data / "jobs"

    @property
    def uploads_dir(self) -> Path:
        """Uploaded models, one folder each (clients name them ``upload:NAME``)."""
        return self.data / "models"

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def package_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / PACKAGE_DIR

    def threads_per_job(self) -> int:
        return self.job_threads or max(1, (os.cpu_count() or 1) // self.max_jobs)

    def prepare(self) -> None:
        """Create the data folder's layout (the database is created by ``JobStore``)."""
        for folder in (self.data, self.jobs_dir, self.uploads_dir):
            folder.mkdir(parents=True, exist_ok=True)

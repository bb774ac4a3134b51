"""One job, in its own process: the CLI's ``run_job``, with its progress and outcome in the database.

``run`` is the target of the process ``uqcit.server.jobs.JobRunner`` starts for a job (forked from
the server's fork server, which has torch and the stages imported already: see
``uqcit.server.preload``). A cancelled job's process is killed; every write here is conditional on
the run still being current (``JobStore.progress``/``finish``), so a killed or orphaned run never
overwrites what the server decided.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from pathlib import Path

from uqcit.core.io import atomic_write
from uqcit.pipeline import Session, run_job
from uqcit.server.db import JobStore
from uqcit.server.settings import PACKAGE_DIR, REPORT_FILE


class Superseded(Exception):
    """The run is no longer current (cancelled, or failed by a restarted server): stop working on it."""


class _ProgressSession(Session):
    """A ``Session`` that records each stage it starts as the job's progress, and the package step
    (export, load back, evaluate, seal) once ``run_job`` has run every recipe stage."""

    def bind(self, report, done: int) -> "_ProgressSession":
        self._report, self._done = report, done
        return self

    def run_stage(self, config):
        self._report(config.type_tag, self._done)
        result = super().run_stage(config)
        self._done += 1
        return result

    def run(self, recipe, *, skip=()):
        results = super().run(recipe, skip=skip)
        self._report("package", self._done)
        return results


def run(db_path: str, job_id: str, token: str, job_dir: str, model: str, secret: tuple[bytes, str] | None,
        sign_key: str | None, sign_key_passphrase_env: str | None, threads: int, server_pid: int) -> None:
    """Run job ``job_id`` (run ``token``) on ``model`` (as ``load_model`` takes it), writing the
    package to ``job_dir/package`` and the report beside it. ``secret``: (material, kind) of a
    ``uqcit.package.secure.Secret``, for encrypt/encode; ``server_pid``: the server, whose end ends it."""
    _exit_with_server(server_pid)
    import torch

    torch.set_num_threads(threads)
    store = JobStore(db_path)
    try:
        report = _run(store, job_id, token, Path(job_dir), model, secret, sign_key, sign_key_passphrase_env)
    except Superseded:
        return
    except BaseException as exc:  # the process boundary: every failure is recorded on the job
        store.finish(job_id, token, "failed", error=failure(exc))
        traceback.print_exc(file=sys.stderr)  # the server's log keeps the whole story
        raise SystemExit(1) from None
    store.finish(job_id, token, "succeeded", report_json=report)


def failure(exc: BaseException) -> str:
    """A job's ``error``: the exception's type and its message on one line.

    >>> failure(FileNotFoundError(2, "No such file or directory", "/x/corpus.txt"))
    "FileNotFoundError: [Errno 2] No such file or directory: '/x/corpus.txt'"
    """
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _run(store: JobStore, job_id: str, token: str, job_dir: Path, model: str, secret, sign_key,
         sign_key_passphrase_env) -> str:
    from uqcit.package.secure import ProtectConfig, Secret, load_signing_key
    from uqcit.recipe import Recipe
    from uqcit.stages.evaluate import EvalConfig

    job = store.get(job_id)
    recipe = Recipe.from_json(job.recipe_json)
    options = job.options
    eval_config = recipe.stage("eval") or EvalConfig()
    if options.get("quick") is not None:  # as `uqcit compress --quick N`
        eval_config = eval_config.replace(max_windows=options["quick"])
    protect = ProtectConfig(encrypt=options.get("encrypt", False), encode=options.get("encode", False))
    signing_key = None
    if options.get("sign"):
        passphrase = os.environ.get(sign_key_passphrase_env) if sign_key_passphrase_env else None
        signing_key = load_signing_key(sign_key, passphrase=passphrase)

    def report(stage: str, done: int) -> None:
        if not store.progress(job_id, token, stage, done):
            raise Superseded(job_id)

    report("load", 0)
    session = _ProgressSession.from_model(model, progress=False).bind(report, 1)
    job_dir.mkdir(parents=True, exist_ok=True)
    result = run_job(model, recipe, job_dir / PACKAGE_DIR, eval_config=eval_config, progress=False,
                     session=session,
                     signing_key=signing_key, protect=protect if protect.active else None,
                     secret=None if secret is None else Secret(*secret))
    text = result.to_json()
    atomic_write(job_dir / REPORT_FILE, (text + "\n").encode())
    return text


def _exit_with_server(pid: int, interval: float = 0.5) -> None:
    """Exit when the server process ``pid`` is gone (killed): an orphaned job must not keep running
    for a server that no longer exists. Its parent, the fork server, is no sign: it lives on as
    long as any job process does (each holds its liveness pipe)."""
    born = _start_time(pid)

    def watch() -> None:
        while True:
            time.sleep(interval)
            if _start_time(pid) != born:  # gone, a zombie, or the pid reused by another process
                os._exit(70)  # no cleanup: the restarted server fails this run

    threading.Thread(target=watch, name="uqcit-server-watch", daemon=True).start()


def _start_time(pid: int) -> str | None:
    """The start time of a live process (field 22 of /proc/PID/stat); None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (name) ": state is the first field
    return None if fields[0] in ("Z", "X") else fields[19]

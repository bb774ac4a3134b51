"""The job runner: a queue in the database, at most ``max_jobs`` job processes at a time.

One thread of the server starts the oldest queued job whenever fewer than ``max_jobs`` run, each in
its own process (``uqcit.server.worker.run``) forked from a fork server that has imported torch
and the stages once (``uqcit.server.preload``), and notices processes that end. Cancelling a
running job kills its process: the only way to stop a stage mid-computation, and a clean one, as
the package is swapped in only as a job's last step.

A server that starts fails the jobs its previous run left running (their process died with it)
and keeps the queued ones; a queued job that needs a secret fails too, since secrets are held in
memory only, never written down.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import threading
from multiprocessing import forkserver

from uqcit.server.checks import ApiError, resolve_model
from uqcit.server.db import JobStore
from uqcit.server.settings import ServerSettings

log = logging.getLogger("uqcit.server")

INTERRUPTED = "interrupted: the server stopped while this job ran; submit it again"
SECRET_LOST = ("interrupted: the server restarted before this job ran, and its secret is never "
               "stored; submit it again")
POLL_SECONDS = 0.2  # how often ended processes and new jobs are looked for, when not woken
PRELOAD = ["uqcit.server.preload"]


def start_fork_server() -> None:
    """Start the fork server job processes come from, importing ``PRELOAD`` (seconds, once): the
    server calls it first, so this runs while the server itself starts."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()


class JobRunner:
    """Starts queued jobs, reaps ended ones, cancels on request (see the module docstring)."""

    def __init__(self, settings: ServerSettings, store: JobStore):
        self.settings, self.store = settings, store
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(PRELOAD)
        self._running: dict[str, tuple[multiprocessing.process.BaseProcess, str]] = {}  # id -> (process, token)
        self._secrets: dict[str, tuple[bytes, str]] = {}  # job id -> Secret (material, kind), until it starts
        self._lock = threading.Lock()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name="uqcit-jobs", daemon=True)

    def start(self) -> None:
        """Settle what the last run of the server left, then start running jobs."""
        self.settle()
        self._thread.start()

    def settle(self) -> None:
        """Fail the jobs a previous server left running, and the queued ones whose secret it held."""
        for job_id in self.store.fail_running(INTERRUPTED):
            log.warning("job %s was running when the server stopped: marked failed", job_id)
        for job in self.store.queued():
            if _needs_secret(job.options) and job.id not in self._secrets:
                self.store.fail_queued(job.id, SECRET_LOST)

    def stop(self) -> None:
        """Stop starting jobs; kill running ones, marking them failed (interrupted)."""
        self._stop.set()
        self._wake.set()
        self._thread.join()
        with self._lock:
            running, self._running = self._running, {}
        for job_id, (proc, token) in running.items():
            self.store.finish(job_id, token, "failed", error=INTERRUPTED)
            _kill(proc)

    def submit(self, job_id: str, secret: tuple[bytes, str] | None = None) -> None:
        """A job was queued; ``secret`` is held in memory until its process starts."""
        with self._lock:
            if secret is not None:
                self._secrets[job_id] = secret
        self._wake.set()

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job (killing its process); False when it had already ended."""
        with self._lock:
            if not self.store.cancel(job_id):
                return False
            self._secrets.pop(job_id, None)
            entry = self._running.pop(job_id, None)
        if entry is not None:
            _kill(entry[0])
        shutil.rmtree(self.settings.job_dir(job_id), ignore_errors=True)  # half a job is no result
        self._wake.set()
        return True

    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def _loop(self) -> None:
        forkserver.ensure_running()  # started already by `uqcit serve`; here for other callers
        while not self._stop.is_set():
            self._reap()
            self._start_queued()
            self._wake.wait(POLL_SECONDS)
            self._wake.clear()

    def _reap(self) -> None:
        with self._lock:
            ended = [(job_id, proc, token) for job_id, (proc, token) in self._running.items()
                     if proc.exitcode is not None]
            for job_id, _, _ in ended:
                del self._running[job_id]
        for job_id, proc, token in ended:
            proc.join()
            # A process that ended without recording an outcome was killed (out of memory...).
            if self.store.finish(job_id, token, "failed", error=f"the job's process ended (exit code "
                                 f"{proc.exitcode}) without a result; the server's log may say why"):
                log.error("job %s: process ended with exit code %s and no result", job_id, proc.exitcode)

    def _start_queued(self) -> None:
        from uqcit.server import worker  # torch and the pipeline: imported by the fork server already

        with self._lock:
            while len(self._running) < self.settings.max_jobs and not self._stop.is_set():
                job = self.store.claim_next()
                if job is None:
                    return
                secret = self._secrets.pop(job.id, None)
                if _needs_secret(job.options) and secret is None:
                    self.store.finish(job.id, job.run_token, "failed", error=SECRET_LOST)
                    continue
                try:  # checked at submission; checked again: the server may restart with other folders
                    model = resolve_model(job.model, self.settings)
                except ApiError as exc:
                    self.store.finish(job.id, job.run_token, "failed", error=exc.message)
                    continue
                s = self.settings
                proc = self._ctx.Process(
                    target=worker.run, name=f"uqcit-job-{job.id[:8]}",
                    args=(str(s.db_path), job.id, job.run_token, str(s.job_dir(job.id)), model, secret,
                          None if s.sign_key is None else str(s.sign_key), s.sign_key_passphrase_env,
                          s.threads_per_job(), os.getpid()))
                proc.start()
                self.store.set_pid(job.id, job.run_token, proc.pid)
                self._running[job.id] = (proc, job.run_token)
                log.info("job %s started (pid %s)", job.id, proc.pid)


def _needs_secret(options: dict) -> bool:
    return bool(options.get("encrypt") or options.get("encode"))


def _kill(proc, grace: float = 5.0) -> None:
    """Terminate a job process, then kill it if it lingers; wait for it either way."""
    if proc.exitcode is None:
        proc.terminate()
        proc.join(grace)
        if proc.exitcode is None:
            proc.kill()
    proc.join()

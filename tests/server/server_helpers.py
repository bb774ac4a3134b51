"""Helpers of the server tests: a real ``uqcit serve`` process, keys, tiny models, job waits."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from uqcit.client import Client
from uqcit.recipe import builtin_recipe
from uqcit.stages.evaluate import EvalConfig
from uqcit.stages.retrain import RetrainConfig

# A job that takes seconds: a tiny model, one short evaluation window.
QUICK = builtin_recipe("rtn-w4-g128").with_stage(EvalConfig(max_windows=1, window=128, total_tokens=1024))
# A job that runs until it is cancelled: self-retraining on 100,000 generated sequences.
LONG = QUICK.with_stage(RetrainConfig(n_sequences=100_000, gen_batch=4))
START_TIMEOUT = 120.0


class ServerProcess:
    """``uqcit serve --data DATA --port 0 ...`` as a child process; ``url`` once it listens."""

    def __init__(self, data: Path, *args: str):
        data.mkdir(parents=True, exist_ok=True)
        self.args = args
        self.data, self.log = data, data.parent / f"{data.name}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
        start = self.log.stat().st_size if self.log.exists() else 0  # a restart appends to the log
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "uqcit.cli", "serve", "--data", str(data), "--port", "0",
                 "--job-threads", "1", *args], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT
        while not (found := re.search(r"serving (http://\S+)", self.log.read_bytes()[start:].decode())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"uqcit serve did not start:\n{self.log.read_text()}")
            time.sleep(0.05)
        self.url = found.group(1)
        while True:  # the port is bound before the app has started: wait for its first answer
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"uqcit serve does not answer:\n{self.log.read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM: a graceful stop (uvicorn then ends by re-raising the signal, status -15)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(60)
        log = self.log.read_text()
        assert status in (0, -signal.SIGTERM) and "Application shutdown complete" in log, log[-3000:]

    def kill(self) -> None:
        """SIGKILL: the server dies without any cleanup, as in a crash."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(60)


def new_key(data: Path, name: str = "tests") -> str:
    """An API key for the server of ``data`` (what `uqcit serve-key create` does)."""
    from uqcit.server.auth import create_key
    from uqcit.server.db import DB_FILE, JobStore

    data.mkdir(parents=True, exist_ok=True)
    store = JobStore(data / DB_FILE)
    try:
        return create_key(store, name)[1]
    finally:
        store.close()


def tiny_model_folder(folder: Path) -> Path:
    """A tiny random Llama saved as a transformers folder (safetensors): ~0.7 MB."""
    from uqcit.inputs.tiny import tiny_model

    model, tokenizer = tiny_model("llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def events_until(client: Client, job_id: str, done) -> dict:
    """Follow a job's events until ``done(job)``; the job then. Fails if it ends first."""
    for _, job in client.events(job_id):
        if done(job):
            return job
        assert job["state"] in ("queued", "running"), job
    raise AssertionError(f"job {job_id} ended before the condition: {client.job(job_id)}")


def running_stage(stage: str):
    return lambda job: job["state"] == "running" and job["stage"] == stage


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (ended, not yet reaped by its parent) counts as gone.
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())


def job_pid(data: Path, job_id: str) -> int:
    from uqcit.server.db import DB_FILE, JobStore

    store = JobStore(data / DB_FILE)
    try:
        return store.get(job_id).pid
    finally:
        store.close()



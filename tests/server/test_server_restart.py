"""A server that crashes and restarts: finished jobs are kept, interrupted ones failed with a reason.

The shared server is killed (SIGKILL, no cleanup) while a job runs; a new server process then
starts on the same data folder.
"""
from __future__ import annotations

import time

from server_helpers import LONG, QUICK, events_until, job_pid, pid_alive, running_stage

from uqcit.server.db import DB_FILE, JobStore
from uqcit.server.jobs import INTERRUPTED, SECRET_LOST, JobRunner
from uqcit.server.settings import ServerSettings


def test_a_restart_keeps_finished_jobs_and_fails_interrupted_ones(server, tmp_path):
    with server.client() as client:
        done = client.submit("tiny-llama", QUICK)["id"]
        assert client.wait(done)["state"] == "succeeded"
        report = client.report(done)
        running = client.submit("tiny-llama", LONG)["id"]
        events_until(client, running, running_stage("retrain"))
    pid = job_pid(server.data, running)

    server.restart(kill=True)
    deadline = time.monotonic() + 30
    while pid_alive(pid):  # the orphaned job process notices and exits (uqcit.server.worker)
        assert time.monotonic() < deadline, "a job process outlived its server"
        time.sleep(0.1)

    with server.client() as client:
        assert client.job(done)["state"] == "succeeded"
        assert client.report(done) == report
        client.download_package(done, tmp_path / "pkg")
        job = client.job(running)
        assert (job["state"], job["error"]) == ("failed", INTERRUPTED)


def test_a_queued_job_whose_secret_was_in_memory_fails_on_restart(tmp_path):
    store = JobStore(tmp_path / DB_FILE)
    add = lambda **options: store.add(model="tiny-llama", recipe_json="{}", recipe_name="r",  # noqa: E731
                                      options=options, stages=["load", "package"]).id
    plain, secret = add(encrypt=False), add(encrypt=True)
    JobRunner(ServerSettings(data=tmp_path), store).settle()  # what a starting server does first
    assert store.get(plain).state == "queued"  # kept: it runs on the new server
    assert (store.get(secret).state, store.get(secret).error) == ("failed", SECRET_LOST)

"""The REST API under load: 20 concurrent tiny-model jobs submitted to one server.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/server.py [--jobs 20] [--max-jobs 2]

Starts `uqcit serve` on a free loopback port (its own process, a temporary data folder), submits
``--jobs`` jobs at once from as many client threads (each then follows its job's event stream),
and checks that every job succeeds, none is lost (the server lists exactly the submitted jobs,
each with its package downloadable and intact). Reports throughput (jobs per minute, wall time
from the first submission to the last end) and queue wait (start - creation, from the server's
records). Jobs: tiny-llama, rtn-w4-g128, a 1-window quick evaluation (seconds each). Writes
benchmarks/results/server.json and server.md.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import record, write  # noqa: E402

from uqcit.client import Client  # noqa: E402
from uqcit.recipe import builtin_recipe  # noqa: E402
from uqcit.server.auth import create_key  # noqa: E402
from uqcit.server.db import DB_FILE, JobStore  # noqa: E402
from uqcit.stages.evaluate import EvalConfig, EvalResult  # noqa: E402

MODEL = "tiny-llama"
RECIPE = builtin_recipe("rtn-w4-g128").with_stage(EvalConfig(max_windows=1, window=128, total_tokens=1024))


def _serve(data: Path, max_jobs: int) -> tuple[subprocess.Popen, str, Path]:
    log = data.parent / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "uqcit.cli", "serve", "--data", str(data), "--port", "0",
                                 "--max-jobs", str(max_jobs), "--job-threads", "1"], stdout=out,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (m := re.search(r"serving (http://\S+)", log.read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the server did not start:\n{log.read_text()}")
        time.sleep(0.1)
    return proc, m.group(1), log


def _stats(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {"mean": round(statistics.fmean(values), 3), "p50": round(statistics.median(values), 3),
            "p95": round(values[min(len(values) - 1, round(0.95 * (len(values) - 1)))], 3),
            "max": round(values[-1], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--max-jobs", type=int, default=2, help="the server's concurrent job slots")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        store = JobStore(data / DB_FILE)
        key = create_key(store, "benchmark")[1]
        store.close()
        t_start = time.perf_counter()
        proc, url, log = _serve(data, args.max_jobs)
        try:
            with Client(url, key) as c:
                c.health()  # the socket listens already: this waits for the app to start
            startup = time.perf_counter() - t_start

            def one(_: int) -> dict:
                with Client(url, key) as client:
                    job = client.submit(MODEL, RECIPE)
                    return client.wait(job["id"])

            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.jobs) as pool:
                ended = list(pool.map(one, range(args.jobs)))
            wall = time.perf_counter() - t0

            with Client(url, key) as c:
                listed = c.jobs(limit=1000)
                ids = {j["id"] for j in ended}
                intact = 0
                for job_id in sorted(ids):
                    c.download_package(job_id, Path(tmp) / "dl" / job_id)  # manifest-checked
                    intact += 1
                report = c.report(ended[0]["id"])
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            log_text = log.read_text()

    states = {s: sum(j["state"] == s for j in ended) for s in ("succeeded", "failed", "cancelled")}
    lost = len(ids ^ {j["id"] for j in listed}) + (args.jobs - len(ids))
    queue = [j["queue_seconds"] for j in ended]
    run = [j["finished_at"] - j["started_at"] for j in ended]
    latency = [j["finished_at"] - j["created_at"] for j in ended]
    ev = EvalResult(**report["compressed"])
    rec = record(model=MODEL, method=report["method"], bpw=report["bpw"], package_bytes=report["package_bytes"],
                 ev=ev, seconds={"server_startup": round(startup, 2), "wall": round(wall, 2)},
                 benchmark="server", jobs_submitted=args.jobs, max_jobs=args.max_jobs, job_threads=1,
                 states=states, jobs_lost=lost, packages_intact=intact,
                 throughput_jobs_per_min=round(60 * args.jobs / wall, 2),
                 queue_wait_s=_stats(queue), run_s=_stats(run), latency_s=_stats(latency),
                 note="one server on loopback, jobs submitted at once from as many threads; each job loads "
                 "tiny-llama, quantizes it (rtn-w4-g128), exports, loads back and evaluates 1 window")
    write("server", [rec])
    print(f"{args.jobs} jobs, {states}, lost {lost}, packages intact {intact}; wall {wall:.1f} s, "
          f"{rec['throughput_jobs_per_min']} jobs/min; queue wait {rec['queue_wait_s']}; run {rec['run_s']}")
    if states["succeeded"] != args.jobs or lost or intact != args.jobs:
        raise SystemExit(f"not every job succeeded intact; the server's log:\n{log_text[-5000:]}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()

"""Real kills of an exporting process, races of exporters, reproducible bytes and the cost of the manifest check.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/export_faults.py [--random 40] [--rounds 5]

Every kill is a real ``SIGKILL`` of a forked exporter (no ``finally``, no cleanup, the lock
dropped by the kernel). Step kills: the child sets ``uqcit.package.swap.FAULT_HOOK`` to
``os.kill(os.getpid(), SIGKILL)`` at one file-system step (each occurrence of each step of an
export, plain and signed, of ``write_validation``, of the recovery of leftovers, and of the
two-rename fallback). Random kills: the parent kills the child after a uniformly drawn delay
within the measured export time. After each kill: the target must hold a package that loads
and verifies (manifest, and signature when signed), the old one or the new one; then the next
export must leave no ``.NAME.tmp-*``/``.NAME.old-*`` folder. Concurrent exporters: forked
processes exporting to one target at once. Reproducible bytes: two fresh interpreters export
the same seed and recipe. Writes benchmarks/results/export_faults.json and .md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import RESULTS, machine  # noqa: E402

from uqcit.inputs.tiny import tiny_model  # noqa: E402
from uqcit.package import export_package, load_package, read_metadata, write_validation  # noqa: E402
from uqcit.package import swap  # noqa: E402
from uqcit.package.secure import generate_signing_key, verify_package  # noqa: E402
from uqcit.package.secure.signing import verify_manifest  # noqa: E402
from uqcit.stages.levels import analyze_levels  # noqa: E402
from uqcit.stages.plan import PlanConfig, build_plan  # noqa: E402
from uqcit.stages.quantize import quantize_model  # noqa: E402

KEY = generate_signing_key()


def tiny_record(seed: int = 0):
    model, tok = tiny_model("llama", seed=seed)
    levels = analyze_levels(model)
    plan = build_plan(levels, PlanConfig(preset="uniform", bits=4, group_size=32))
    return quantize_model(model, levels, plan, progress=False).export_record(), tok


def leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir()
                  if p.name.startswith(f".{target.name}.") and (".tmp-" in p.name or ".old-" in p.name))


def whole(target: Path, signed: bool) -> str | None:
    """Which run's package is at ``target`` if it loads and verifies, else None."""
    try:
        verify_manifest(target)
        if signed:
            verify_package(target, KEY.public_key())
        load_package(target, progress=False, public_key=KEY.public_key() if signed else None)
        return read_metadata(target)["source_model"]
    except Exception as exc:  # noqa: BLE001 - a benchmark counts every failure, whatever it is
        print(f"  NOT WHOLE: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


FS_CALLS = [(os, "replace"), (os, "rename"), (os, "mkdir"), (os, "link"), (os, "unlink"), (os, "rmdir"),
            (shutil, "rmtree"), (swap, "exchange")]  # every call that changes names or folders


def wrap_fs_calls(before) -> None:
    """Call ``before(name)`` ahead of every file-system call in FS_CALLS (in this process)."""
    for mod, attr in FS_CALLS:
        real = getattr(mod, attr)

        def wrapped(*a, _real=real, _name=f"{mod.__name__}.{attr}", **k):
            before(_name)
            return _real(*a, **k)
        setattr(mod, attr, wrapped)


def fork_run(job, *, kill_at: tuple[str, int] | None = None, kill_call: int | None = None,
             kill_after: float | None = None, trace: Path | None = None) -> int:
    """Run ``job()`` in a forked child; SIGKILL it at a step, before its N-th file-system call, or
    after a delay; ``trace`` gets the name of each step it passed. Returns its wait status."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            seen: list[str] = []
            fd = os.open(trace, os.O_WRONLY | os.O_CREAT | os.O_APPEND) if trace else None

            def hook(name):
                seen.append(name)
                if fd is not None:
                    os.write(fd, (name + "\n").encode())
                if (name, seen.count(name) - 1) == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            swap.FAULT_HOOK = hook
            if kill_call is not None:
                calls = [0]

                def before(name):
                    calls[0] += 1
                    if calls[0] - 1 == kill_call:
                        os.kill(os.getpid(), signal.SIGKILL)
                wrap_fs_calls(before)
            job()
        except BaseException as exc:  # noqa: BLE001 - reported through the exit code
            print(f"  child failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            code = 2
        os._exit(code)
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def probe(job) -> list[tuple[str, int]]:
    seen: list[str] = []
    swap.FAULT_HOOK = seen.append
    try:
        job()
    finally:
        swap.FAULT_HOOK = None
    return [(name, seen[:i].count(name)) for i, name in enumerate(seen)]


class Tally:
    def __init__(self, name: str):
        self.name, self.kills, self.whole, self.old, self.new = name, 0, 0, 0, 0
        self.missing, self.clean_after_next, self.not_killed, self.failures = 0, 0, 0, []
        self.fallback_window: list[str] = []

    def after_kill(self, status: int, target: Path, signed: bool, old: str, new: str, what: str,
                   *, window_ok: bool = False) -> None:
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            self.kills += 1
        else:
            self.not_killed += 1  # finished before the delay (random kills)
        got = whole(target, signed) if target.exists() or not window_ok else None
        if got is None:
            self.missing += 1
            if not window_ok:
                self.failures.append(what)
            else:  # the two-rename fallback's stated window: restored by the next export
                self.fallback_window.append(what)
        else:
            self.whole += 1
            self.old += got == old
            self.new += got == new

    def next_export(self, record, target: Path, signed: bool, name: str) -> None:
        export_package(*record, target, source_model=name, signing_key=KEY if signed else None)
        if leftovers(target) == [] and whole(target, signed) == name:
            self.clean_after_next += 1
        else:
            self.failures.append(f"next export after {name}: leftovers {leftovers(target)}")

    def to_dict(self):
        return {k: v for k, v in vars(self).items()}


def step_kills(record, root: Path, signed: bool, *, fallback: bool = False) -> Tally:
    tally = Tally(f"step kills, export{' --sign' if signed else ''}{', two-rename fallback' if fallback else ''}")
    target = root / "pkg"
    key = KEY if signed else None
    export_package(*record, target, source_model="v0", signing_key=key)
    real_exchange = swap.exchange
    if fallback:
        swap.exchange = lambda a, b: False
    try:
        points = probe(lambda: export_package(*record, target, source_model="v0", signing_key=key))
        for i, at in enumerate(points):
            old = whole(target, signed) or "?"
            status = fork_run(lambda: export_package(*record, target, source_model=f"k{i}", signing_key=key),
                              kill_at=at)
            tally.after_kill(status, target, signed, old, f"k{i}", f"{at}", window_ok=fallback)
            tally.next_export(record, target, signed, f"n{i}")
    finally:
        swap.exchange = real_exchange
    tally.points = [f"{n}#{k}" for n, k in points]
    return tally


def call_kills(record, root: Path, signed: bool) -> Tally:
    """Kill before each file-system call (rename, replace, mkdir, link, unlink, rmtree, renameat2)."""
    tally = Tally(f"kills before each file-system call, export{' --sign' if signed else ''}")
    target = root / "pkg"
    key = KEY if signed else None
    export_package(*record, target, source_model="v0", signing_key=key)
    names: list[str] = []
    saved = [(mod, attr, getattr(mod, attr)) for mod, attr in FS_CALLS]
    wrap_fs_calls(names.append)
    try:
        export_package(*record, target, source_model="v0", signing_key=key)
    finally:
        for mod, attr, real in saved:
            setattr(mod, attr, real)
    for i in range(len(names)):
        old = whole(target, signed) or "?"
        status = fork_run(lambda: export_package(*record, target, source_model=f"k{i}", signing_key=key),
                          kill_call=i)
        tally.after_kill(status, target, signed, old, f"k{i}", f"before call {i} ({names[i]})")
        tally.next_export(record, target, signed, f"n{i}")
    tally.points = {n: names.count(n) for n in sorted(set(names))}
    return tally


def validation_kills(record, root: Path) -> Tally:
    tally = Tally("step kills, write_validation on a signed package (copy-on-write)")
    target = export_package(*record, root / "pkg", source_model="v", signing_key=KEY)
    points = probe(lambda: write_validation(target, "perplexity", {"ppl": -1.0}, signing_key=KEY))
    for i, at in enumerate(points):
        before = json.loads((target / "validation" / "perplexity.json").read_text())
        status = fork_run(lambda: write_validation(target, "perplexity", {"ppl": float(i)}, signing_key=KEY),
                          kill_at=at)
        tally.after_kill(status, target, True, "v", "v", f"{at}")
        after = json.loads((target / "validation" / "perplexity.json").read_text())
        if after not in (before, {"ppl": float(i)}):
            tally.failures.append(f"{at}: perplexity.json is neither the old nor the new one")
        write_validation(target, "benchmarks", {"kl": float(i)}, signing_key=KEY)
        tally.clean_after_next += leftovers(target) == []
    return tally


def recovery_kills(record, root: Path) -> Tally:
    """Kill the export that is cleaning up a killed one (at each of its recovery steps)."""
    tally = Tally("step kills during the recovery of a killed export's leftovers")
    target = export_package(*record, root / "pkg", source_model="r0")
    for i, at in enumerate([("recover:remove-stale", 0), ("stage:mkdir", 0)]):
        fork_run(lambda: export_package(*record, target, source_model="x"), kill_at=("swap:exchanged", 0))
        old = whole(target, False) or "?"  # "x": the old package sits in a .tmp- folder now
        status = fork_run(lambda: export_package(*record, target, source_model=f"r{i + 1}"), kill_at=at)
        tally.after_kill(status, target, False, old, f"r{i + 1}", f"{at}")
        tally.next_export(record, target, False, f"rn{i}")
    return tally


def random_kills(record, root: Path, signed: bool, n: int, rng: random.Random) -> Tally:
    tally = Tally(f"random-time kills, export{' --sign' if signed else ''}")
    target = root / "pkg"
    key = KEY if signed else None
    export_package(*record, target, source_model="v0", signing_key=key)
    durations = []  # of whole exports in forked children, as the killed ones run
    for _ in range(3):
        t0 = time.perf_counter()
        fork_run(lambda: export_package(*record, target, source_model="v0", signing_key=key))
        durations.append(time.perf_counter() - t0)
    span = sorted(durations)[1]
    tally.delays, tally.last_step = [], {}
    trace = root / "trace.txt"
    i = 0
    while tally.kills < n and i < 3 * n:  # until n children died mid-export (some finish first)
        i += 1
        delay = rng.uniform(0.0, span)
        tally.delays.append(round(delay, 4))
        old = whole(target, signed) or "?"
        trace.unlink(missing_ok=True)
        status = fork_run(lambda: export_package(*record, target, source_model=f"k{i}", signing_key=key),
                          kill_after=delay, trace=trace)
        steps = trace.read_text().split() if trace.exists() else []
        last = steps[-1] if steps else "(before the first step)"
        if os.WIFSIGNALED(status):  # killed: where it was
            tally.last_step[last] = tally.last_step.get(last, 0) + 1
        tally.after_kill(status, target, signed, old, f"k{i}", f"random {delay:.3f} s after {last}")
        tally.next_export(record, target, signed, f"n{i}")
    tally.export_seconds = round(span, 4)
    return tally


def concurrent(record, root: Path, rounds: int, writers: int = 4) -> dict:
    target = root / "pkg"
    out = {"rounds": rounds, "writers": writers, "all_finished": 0, "whole_and_one_runs": 0,
           "clean": 0, "timeouts_clear": 0, "timeout_round_whole": False}
    for r in range(rounds):
        names = [f"c{r}-{w}" for w in range(writers)]
        pids = []
        for name in names:
            pid = os.fork()
            if pid == 0:
                try:
                    export_package(*record, target, source_model=name, signing_key=KEY)
                    os._exit(0)
                except BaseException:  # noqa: BLE001
                    os._exit(2)
            pids.append(pid)
        codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
        out["all_finished"] += all(c == 0 for c in codes)
        out["whole_and_one_runs"] += whole(target, True) in names
        out["clean"] += leftovers(target) == []
    # with a lock timeout shorter than an export: the losers fail clearly, the winner's package stands
    errs = root / "errors.txt"
    pids = []
    for w in range(writers):
        pid = os.fork()
        if pid == 0:
            try:
                export_package(*record, target, source_model=f"t{w}", signing_key=KEY, lock_timeout=0.01)
                os._exit(0)
            except Exception as exc:  # noqa: BLE001
                with open(errs, "a") as f:
                    f.write(f"{type(exc).__name__}: {exc}\n")
                os._exit(2)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
    lines = errs.read_text().splitlines() if errs.exists() else []
    out["timeout_exit_codes"] = codes
    out["timeouts_clear"] = sum("holds this lock" in line and "PackageError" in line for line in lines)
    out["timeout_message"] = lines[0] if lines else None
    candidates = {f"t{w}" for w in range(writers)} | {f"c{rounds - 1}-{w}" for w in range(writers)}
    out["timeout_round_whole"] = whole(target, True) in candidates
    return out


REPRO = """
import hashlib, json, sys
from pathlib import Path
sys.path.insert(0, {bench!r})
import export_faults as ef
from uqcit.package import export_package
from uqcit.package.secure import load_signing_key
out = Path(sys.argv[1])
export_package(*ef.tiny_record(0), out, source_model="tiny-llama", reproducible=True,
               signing_key=load_signing_key(sys.argv[2]))
print(json.dumps({{p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                  for p in sorted(out.rglob("*")) if p.is_file()}}))
"""


def reproducible(root: Path) -> dict:
    from uqcit.package.secure import save_signing_key

    keyfile = root / "key.pem"
    save_signing_key(KEY, keyfile)
    runs = []
    for i, seed in enumerate(("1", "2")):
        env = dict(os.environ, PYTHONHASHSEED=seed, OMP_NUM_THREADS="1")
        env.pop("SOURCE_DATE_EPOCH", None)
        proc = subprocess.run([sys.executable, "-c", REPRO.format(bench=str(Path(__file__).parent)),
                               str(root / f"r{i}"), str(keyfile)], capture_output=True, text=True, env=env,
                              timeout=600, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    differ = sorted(k for k in set(runs[0]) | set(runs[1]) if runs[0].get(k) != runs[1].get(k))
    return {"processes": 2, "files": len(runs[0]), "differing_files": differ, "signed": True}


def manifest_cost(record, root: Path) -> dict:
    target = export_package(*record, root / "cost", source_model="cost")
    t = {}
    for label, kw in (("load_verified", {}), ("load_unverified", {"verify": False})):
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            load_package(target, progress=False, **kw)
            times.append(time.perf_counter() - t0)
        t[label] = min(times)
    t0 = time.perf_counter()
    for _ in range(5):
        verify_manifest(target)
    t["verify_manifest"] = (time.perf_counter() - t0) / 5
    blob = root / "blob.bin"
    size = 100 * 2**20
    with open(blob, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(2**20))
    t0 = time.perf_counter()
    h = hashlib.sha256()
    with open(blob, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    sha_s = time.perf_counter() - t0
    mb_s = size / 2**20 / sha_s
    return {"tiny_package_bytes": sum(p.stat().st_size for p in target.rglob("*") if p.is_file()),
            **{k: round(v, 4) for k, v in t.items()},
            "sha256_MiB_per_s": round(mb_s, 1),
            "estimated_seconds_100MB_w4_smollm2": round(100 / mb_s, 2),
            "estimated_seconds_540MB_fp32_smollm2": round(540 / mb_s, 2)}


def markdown(res: dict) -> str:
    rows = ["| scenario | runs | killed (the rest finished first) | whole after kill (old / new) | no package | clean after next export |",
            "|---|---:|---:|---:|---:|---:|"]
    for t in res["kills"]:
        rows.append(f"| {t['name']} | {t['kills'] + t['not_killed']} | {t['kills']} | {t['whole']} "
                    f"({t['old']} / {t['new']}) | {t['missing']} | {t['clean_after_next']} |")
    c = res["concurrent"]
    for t in res["kills"]:
        if "last_step" in t:
            rows.append(f"{t['name']}: last step passed by the killed children: "
                        + ", ".join(f"{k} x{v}" for k, v in sorted(t["last_step"].items())))
        if t["fallback_window"]:
            rows.append(f"{t['name']}: no package at the target (the fallback's stated window, restored by "
                        f"the next export) after: {', '.join(t['fallback_window'])}")
    rows += ["", f"Concurrent exporters: {c['rounds']} rounds of {c['writers']} forked signed exports to one "
             f"target: all finished in {c['all_finished']}/{c['rounds']}, final package whole and one run's in "
             f"{c['whole_and_one_runs']}/{c['rounds']}, no leftovers in {c['clean']}/{c['rounds']}. With "
             f"lock_timeout=0.01 s: exit codes {c['timeout_exit_codes']}, {c['timeouts_clear']} clear "
             f"lock errors, final package whole: {c['timeout_round_whole']}.",
             f"  e.g. `{c['timeout_message']}`",
             "", f"Reproducible bytes (two fresh interpreters, PYTHONHASHSEED 1 and 2, signed, reproducible=True): "
             f"{res['reproducible']['files']} files, differing: {res['reproducible']['differing_files'] or 'none'}.",
             "", "Manifest check cost: " + ", ".join(f"{k} {v}" for k, v in res["manifest_cost"].items()),
             "", f"Failures: {res['failures'] or 'none'}"]
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random", type=int, default=40, help="random-time kills per mode (plain, signed)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of concurrent exporters")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)  # forked children: no thread pool to inherit
    record = tiny_record(0)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    kills = []
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for i, signed in enumerate((False, True)):
            (root / f"s{i}").mkdir()
            kills.append(step_kills(record, root / f"s{i}", signed))
        for i, signed in enumerate((False, True)):
            (root / f"c{i}").mkdir()
            kills.append(call_kills(record, root / f"c{i}", signed))
        (root / "fb").mkdir()
        kills.append(step_kills(record, root / "fb", False, fallback=True))
        (root / "wv").mkdir()
        kills.append(validation_kills(record, root / "wv"))
        (root / "rc").mkdir()
        kills.append(recovery_kills(record, root / "rc"))
        for i, signed in enumerate((False, True)):
            (root / f"r{i}").mkdir()
            kills.append(random_kills(record, root / f"r{i}", signed, args.random, rng))
        (root / "cc").mkdir()
        conc = concurrent(record, root / "cc", args.rounds)
        (root / "rp").mkdir()
        repro = reproducible(root / "rp")
        (root / "mc").mkdir()
        cost = manifest_cost(record, root / "mc")
    res = {"kills": [t.to_dict() for t in kills], "concurrent": conc, "reproducible": repro,
           "manifest_cost": cost, "renameat2": swap._renameat2() is not None,
           "failures": [f"{t.name}: {f}" for t in kills for f in t.failures],
           "seconds": round(time.perf_counter() - t0, 1), "machine": machine(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "export_faults.json").write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    (RESULTS / "export_faults.md").write_text(markdown(res) + "\n")
    print(markdown(res))


if __name__ == "__main__":
    main()

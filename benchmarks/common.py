"""Shared bits of the benchmark scripts: the record format of docs/evaluation.md and a markdown table."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any, Iterable

import torch

from uqcit.core.io import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """Cores, threads and GPU of this machine, as the records state them."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "cpu": platform.processor() or platform.machine(), "platform": platform.platform()}


def record(*, model: str, method: str, bpw: float | None, package_bytes: int | None, ev,
           seconds: dict[str, float], **extra: Any) -> dict[str, Any]:
    """One benchmark record (docs/evaluation.md, "Benchmark records")."""
    return {
        "model": model, "method": method, "bpw": bpw, "package_bytes": package_bytes,
        "ppl": ev.ppl, "kl": ev.kl, "top1": ev.top1, "windows": ev.windows,
        "full_protocol": ev.full_protocol, "seconds": seconds, "torch": torch.__version__,
        "machine": machine(), "date": _dt.date.today().isoformat(), **extra,
    }


def write(name: str, records: list[dict[str, Any]], table: str | None = None) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` and a markdown table ``results/<name>.md``: ``table``, or
    ``markdown(records)`` for records that are all scored packages."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    # Atomic: a benchmark killed mid-write must not leave a truncated record file behind.
    jp = atomic_write(RESULTS / f"{name}.json", (json.dumps(records, indent=2) + "\n").encode())
    mp = atomic_write(RESULTS / f"{name}.md", ((markdown(records) if table is None else table) + "\n").encode())
    return jp, mp


def markdown(records: Iterable[dict[str, Any]]) -> str:
    rows = ["| method | bits/weight | package MB | perplexity | KL | top-1 % | windows |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        f = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
        mb = None if r["package_bytes"] is None else r["package_bytes"] / 1e6
        rows.append(f"| {r['method']} | {f(r['bpw'], '.3f')} | {f(mb, '.1f')} | {r['ppl']:.3f} | "
                    f"{f(r['kl'], '.4f')} | {f(r['top1'], '.2f')} | {r['windows']} |")
    return "\n".join(rows)


def package_candidate(q, tokenizer, levels, workdir: Path, *, model: str,
                      seconds: dict[str, float], **extra: Any) -> dict[str, Any]:
    """Export ``q`` (a ``QuantizeResult``) as a package and load it back from disk: the loaded
    model (``"model"``) and what the record needs about it; score it with ``score_candidates``."""
    import time

    from uqcit.package import export_package, load_package, package_bytes

    t0 = time.perf_counter()
    path = export_package(q, tokenizer, Path(workdir) / q.method_name, source_model=model, levels=levels)
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pkg = load_package(path, progress=False)
    load_s = time.perf_counter() - t0
    return {"model": pkg.model, "method": q.method_name, "bpw": q.bpw, "package_bytes": package_bytes(path),
            "seconds": {**seconds, **{f"quantize.{k}": v for k, v in q.stage_seconds.items()},
                        "export": export_s, "load_package": load_s},
            "extra": extra}


def score_candidates(candidates: list[dict[str, Any]], tokenizer, reference, eval_config, *,
                     model: str) -> list[dict[str, Any]]:
    """Evaluate packaged candidates (``package_candidate``) against ``reference`` on the same
    windows, the reference's log-probs computed once for all: one record per candidate."""
    from uqcit.stages.evaluate import evaluate_many

    res = evaluate_many({c["method"]: c["model"] for c in candidates}, tokenizer, eval_config,
                        reference=reference)
    out = []
    for c in candidates:
        ev = res[c["method"]]
        out.append(record(model=model, method=c["method"], bpw=c["bpw"], package_bytes=c["package_bytes"],
                          ev=ev, seconds={**c["seconds"], "evaluate": ev.seconds},
                          reference_ppl=res["reference"].ppl, **c["extra"]))
    return out


def score_and_merge(name: str, candidates: list[dict[str, Any]], tokenizer, reference, eval_config, *,
                    model: str) -> None:
    """``score_candidates``, merged into ``results/<name>.json``, one line printed per record."""
    for r in merge(name, score_candidates(candidates, tokenizer, reference, eval_config, model=model))[-len(candidates):]:
        print(f"{r['method']}: bpw {r['bpw']:.4f}  ppl {r['ppl']:.3f}  KL {r['kl']:.4f}  top1 {r['top1']:.2f}",
              flush=True)


def merge(name: str, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records of ``results/<name>.json`` with ``new`` replacing those of the same method; written."""
    jp = RESULTS / f"{name}.json"
    old = json.loads(jp.read_text()) if jp.exists() else []
    methods = {r["method"] for r in new}
    records = [r for r in old if r["method"] not in methods] + new
    write(name, records)
    return records

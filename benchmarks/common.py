"""Shared bits of the benchmark scripts: the record format of DESIGN.md and a markdown table."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any, Iterable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """Cores, threads and GPU of this machine, as the records state them."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "cpu": platform.processor() or platform.machine(), "platform": platform.platform()}


def record(*, model: str, method: str, bpw: float | None, package_bytes: int | None, ev,
           seconds: dict[str, float], **extra: Any) -> dict[str, Any]:
    """One benchmark record (DESIGN.md "Benchmark results format")."""
    return {
        "model": model, "method": method, "bpw": bpw, "package_bytes": package_bytes,
        "ppl": ev.ppl, "kl": ev.kl, "top1": ev.top1, "windows": ev.windows,
        "full_protocol": ev.full_protocol, "seconds": seconds, "torch": torch.__version__,
        "machine": machine(), "date": _dt.date.today().isoformat(), **extra,
    }


def write(name: str, records: list[dict[str, Any]]) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` and a markdown table ``results/<name>.md``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    jp = RESULTS / f"{name}.json"
    jp.write_text(json.dumps(records, indent=2) + "\n")
    mp = RESULTS / f"{name}.md"
    mp.write_text(markdown(records) + "\n")
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


def score_quantized(q, tokenizer, reference, levels, workdir: Path, eval_config, *, model: str,
                    seconds: dict[str, float], **extra: Any) -> dict[str, Any]:
    """Export ``q`` (a ``QuantizeResult``) as a package, load it back from disk, evaluate it
    against ``reference`` on the protocol's windows: one benchmark record of what was stored."""
    import time

    from uqcit.evaluate import evaluate_many
    from uqcit.package import export_package, load_package, package_bytes

    method = q.method_name
    t0 = time.perf_counter()
    path = export_package(q, tokenizer, Path(workdir) / method, source_model=model, levels=levels)
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pkg = load_package(path)
    load_s = time.perf_counter() - t0
    res = evaluate_many({method: pkg.model}, tokenizer, eval_config, reference=reference)
    ev = res[method]
    stage = {**seconds, **{f"quantize.{k}": v for k, v in q.stage_seconds.items()},
             "export": export_s, "load_package": load_s, "evaluate": ev.seconds}
    return record(model=model, method=method, bpw=q.bpw, package_bytes=package_bytes(path), ev=ev,
                  seconds=stage, reference_ppl=res["reference"].ppl, **extra)

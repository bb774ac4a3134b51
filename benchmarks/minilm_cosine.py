"""Quality per bit on a float32 source: all-MiniLM-L6-v2 (BERT encoder, 22.7 M weights).

SmolLM2's reference weights sit on a Q4_1 grid (docs/evaluation.md), so gains on it could come
from recovering that grid. MiniLM was trained and shipped in float32. Quality here is the mean
cosine similarity between the float model's and the quantized model's sentence embeddings
(mean-pooled last hidden states, as sentence-transformers pools this model) on the first 256
sentences of lee_background; calibration text comes from after the evaluation span. Every
weight-bearing module is quantized (the word embeddings included), in the same format for each
method, so bits/weight are equal by construction.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/minilm_cosine.py

Writes benchmarks/results/minilm_cosine.json and .md.
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine  # noqa: E402

from uqcit.core.io import write_json  # noqa: E402
from uqcit.inputs.corpus import calibration_batch, corpus_text  # noqa: E402
from uqcit.inputs.models import load_model  # noqa: E402
from uqcit.stages.levels import analyze_levels  # noqa: E402
from uqcit.stages.plan import uniform_plan  # noqa: E402
from uqcit.stages.quantize import QuantizeConfig, quantize_model  # noqa: E402
from uqcit.tensor.formats import parse_format  # noqa: E402

FORMATS = ["w3-g128", "w4-g128"]  # 3.25 and 4.25 bits/weight (fp16 scale and zero per 128)
# Also measured, with --formats: w4-g72-nl (IQ4_NL's levels, 4.22 bits/weight with its tables), the
# best 4.25 format on SmolLM2, to see whether its gain holds on a float32 source.
METHODS = {
    "rtn": QuantizeConfig(method="rtn"),
    "gptq": QuantizeConfig(method="gptq", calib_samples=32, calib_seq_len=128),
    "signround": QuantizeConfig(method="signround", iters=100, calib_samples=32, calib_seq_len=128, micro_batch=4),
}
N_SENTENCES = 256


def sentences(n: int) -> list[str]:
    text = " ".join(corpus_text().split())
    parts = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 5]
    return parts[:n]


@torch.no_grad()
def embed(model, tok, texts: list[str]) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), 32):
        enc = tok(texts[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def cosines(model, tok, texts: list[str], ref_emb: torch.Tensor) -> torch.Tensor:
    """Per-sentence cosine between ``model``'s embeddings of ``texts`` and ``ref_emb`` (the float model's)."""
    return torch.nn.functional.cosine_similarity(embed(model, tok, texts), ref_emb, dim=-1)


def main() -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", nargs="*", default=FORMATS,
                    help="formats to (re)measure; the records of others stay in the file")
    args = ap.parse_args()
    loaded = load_model("minilm-l6")
    ref, tok = loaded.model, loaded.tokenizer
    texts = sentences(N_SENTENCES)
    ref_emb = embed(ref, tok, texts)
    levels = analyze_levels(ref)
    calib = calibration_batch(tok, n_samples=32, seq_len=128, seed=0)
    path = RESULTS / "minilm_cosine.json"
    records = json.loads(path.read_text()) if path.exists() else []
    for fmt in args.formats:
        plan = uniform_plan([m.name for m in levels.quantizable()], parse_format(fmt))
        for name, cfg in METHODS.items():
            t0 = time.perf_counter()
            q = quantize_model(ref, levels, plan, cfg, calibration=calib, progress=False)
            seconds = time.perf_counter() - t0
            cos = cosines(q.model, tok, texts, ref_emb)
            records = [r for r in records if r["method"] != f"{name}-{fmt}"]
            records.append({"model": "minilm-l6", "method": f"{name}-{fmt}", "bpw": q.bpw,
                            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                            "sentences": len(texts), "seconds": {"quantize": seconds},
                            "torch": torch.__version__, "machine": machine()})
            print(f"{name}-{fmt}: bpw {q.bpw:.4f}  cosine {float(cos.mean()):.5f} (min {float(cos.min()):.4f})  "
                  f"{seconds:.0f} s", flush=True)
    write_json(RESULTS / "minilm_cosine.json", records)
    rows = ["| method | bits/weight | mean cosine | min cosine |", "|---|---:|---:|---:|"]
    rows += [f"| {r['method']} | {r['bpw']:.3f} | {r['cosine_mean']:.5f} | {r['cosine_min']:.4f} |" for r in records]
    (RESULTS / "minilm_cosine.md").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()

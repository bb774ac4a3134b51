"""The secure wrapper on SmolLM2-135M: what signing, encryption at rest and keyed encoding
cost, that a protected package computes exactly what the plain one does, what the
keyed-encoded weights compute without their key, and one quantized linear layer
evaluated on CKKS-encrypted activations (when tenseal is installed).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/secure.py [--windows N]

All packages hold the same rtn-w4-g128 model. Timings are seconds on this machine in
this run; the ratios in ``overhead`` compare protected with plain export/load measured
here, in the same run. Writes benchmarks/results/secure.json and secure.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import RESULTS, machine, markdown, record  # noqa: E402

from uqcit.package import secure  # noqa: E402
from uqcit.stages.quantize import quantize_model  # noqa: E402
from uqcit.inputs.corpus import calibration_batch  # noqa: E402
from uqcit.stages.evaluate import EvalConfig, evaluate_many  # noqa: E402
from uqcit.stages.levels import analyze_levels  # noqa: E402
from uqcit.inputs.models import load_model  # noqa: E402
from uqcit.package import export_package, load_package, package_bytes  # noqa: E402
from uqcit.stages.plan import PlanConfig, build_plan  # noqa: E402
from uqcit.tensor.quant import dequantize  # noqa: E402

MODEL = "smollm2-135m"
PROMPTS = ["The capital of France is", "Water boils at a temperature of"]


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _generate(model, tok, prompt: str, n: int = 16) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--windows", type=int, default=None, help="fewer windows (not the full protocol)")
    ap.add_argument("--ckks-rows", type=int, default=32, help="output rows of the CKKS layer slice")
    ap.add_argument("--ckks-tokens", type=int, default=4)
    ap.add_argument("--name", default="secure")
    args = ap.parse_args()

    loaded = load_model(MODEL, progress=False)
    ref, tok = loaded.model, loaded.tokenizer
    levels = analyze_levels(ref)
    q = quantize_model(ref, levels, build_plan(levels, PlanConfig(preset="uniform", bits=4)), progress=False)
    method = q.method_name
    key = secure.generate_signing_key()
    raw = secure.Secret.generate()
    phrase = secure.Secret.from_passphrase("a passphrase only this benchmark knows")
    timings: dict[str, float] = {}
    variants = {
        "plain": {},
        "signed": {"signing_key": key},
        "encrypted": {"protect": secure.ProtectConfig(encrypt=True), "secret": raw},
        "encoded": {"protect": secure.ProtectConfig(encode=True), "secret": raw},
        "signed-encrypted-encoded": {"signing_key": key, "secret": raw,
                                     "protect": secure.ProtectConfig(encrypt=True, encode=True)},
        "signed-encrypted-encoded-passphrase": {"signing_key": key, "secret": phrase,
                                                "protect": secure.ProtectConfig(encrypt=True, encode=True)},
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths, models = {}, {}
        for name, kw in variants.items():
            paths[name], export_s = _timed(export_package, q, tok, Path(tmp) / name, source_model=MODEL,
                                           levels=levels, **kw)
            load_kw = {"secret": kw.get("secret"),
                       "public_key": key.public_key() if "signing_key" in kw else None}
            pkg, load_s = _timed(load_package, paths[name], progress=False, **load_kw)
            models[name] = pkg.model
            rows.append({"variant": name, "export_s": export_s, "load_s": load_s,
                         "package_bytes": package_bytes(paths[name])})
        plain = rows[0]
        for r in rows:
            r["export_ratio"] = r["export_s"] / plain["export_s"]
            r["load_ratio"] = r["load_s"] / plain["load_s"]
            r["exact"] = _same_weights(models[r["variant"]], models["plain"])

        # Sign and verify alone, on a copy of the plain package.
        copy = Path(tmp) / "sign-copy"
        shutil.copytree(paths["plain"], copy)
        _, timings["sign"] = _timed(secure.sign_package, copy, key)
        res, timings["verify"] = _timed(secure.verify_package, copy, key.public_key())
        timings["verify_bytes"] = res.total_bytes
        undecoded, timings["load_undecoded"] = _timed(load_package, paths["encoded"], progress=False,
                                                      decode=False)

        cfg = EvalConfig() if args.windows is None else EvalConfig(max_windows=args.windows)
        cands = {"plain": models["plain"], "decoded": models["signed-encrypted-encoded"],
                 "undecoded": undecoded.model}
        evals = evaluate_many(cands, tok, cfg, reference=ref, progress=False)
        samples = {k: {p: _generate(m, tok, p) for p in PROMPTS} for k, m in cands.items()}

        labels = {"plain": method, "decoded": f"{method}-signed-encrypted-encoded",
                  "undecoded": f"{method}-encoded-run-without-key"}
        records = [record(model=MODEL, method=labels[k], bpw=q.bpw,
                          package_bytes=package_bytes(paths["plain" if k == "plain" else "encoded"]),
                          ev=ev, seconds={"evaluate": ev.seconds}, reference_ppl=evals["reference"].ppl,
                          generations=samples[k])
                   for k, ev in evals.items() if k != "reference"]
        records[0]["secure_variants"] = rows
        records[0]["secure_seconds"] = timings

        # CKKS: a slice of layer 0's q_proj as stored (w4-g128, dequantized), on real activations.
        if secure.ckks_available():
            qlin = dict(models["plain"].named_modules())["model.layers.0.self_attn.q_proj"]
            w = dequantize(qlin.qtensor)[: args.ckks_rows]
            seen = {}
            hook = qlin.register_forward_hook(lambda m, inp, out: seen.setdefault("x", inp[0].detach()))
            with torch.no_grad():
                models["plain"](input_ids=calibration_batch(tok, n_samples=1, seq_len=args.ckks_tokens))
            hook.remove()
            ck = secure.ckks_linear(w, seen["x"][0])
            records.append({"model": MODEL, "method": f"ckks-linear-{method}-q_proj0-rows{args.ckks_rows}",
                            "bpw": q.bpw, "package_bytes": None, "ppl": None, "kl": None, "top1": None,
                            "windows": 0, "full_protocol": False, "seconds": ck.seconds,
                            "ckks": ck.to_dict(), "torch": torch.__version__, "machine": machine(),
                            "date": records[0]["date"]})
        else:
            records.append({"model": MODEL, "method": "ckks-linear", "skipped": "tenseal is not installed"})

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(records, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(_markdown(records) + "\n")
    print(_markdown(records))


def _markdown(records) -> str:
    out = [markdown([r for r in records if r.get("ppl") is not None]), "",
           "| variant | export s | × plain | load s | × plain | package bytes | same weights as plain |",
           "|---|---:|---:|---:|---:|---:|---|"]
    for r in records[0]["secure_variants"]:
        out.append(f"| {r['variant']} | {r['export_s']:.2f} | {r['export_ratio']:.2f} | {r['load_s']:.2f} | "
                   f"{r['load_ratio']:.2f} | {r['package_bytes']:,} | {r['exact']} |")
    t = records[0]["secure_seconds"]
    out += ["", f"sign alone {t['sign']:.2f} s, verify alone {t['verify']:.2f} s "
            f"({t['verify_bytes']:,} bytes hashed)", ""]
    for r in records:
        if "ckks" in r:
            c = r["ckks"]
            out.append(f"CKKS ({r['method']}): {c['rows']}x{c['cols']}, {c['tokens']} tokens, max |error| "
                       f"{c['max_abs_error']:.2e} (max |y| {c['max_abs_output']:.3g}), encrypted time "
                       f"{c['overhead']:,.0f}x plaintext, ciphertext {c['ciphertext_bytes']:,} B per "
                       f"activation vector vs {c['plaintext_bytes']:,} B")
        elif "skipped" in r:
            out.append(f"CKKS: skipped ({r['skipped']})")
    return "\n".join(out)


if __name__ == "__main__":
    main()

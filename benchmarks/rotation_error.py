"""Why the Hadamard rotation hurts round-to-nearest on SmolLM2-135M: weight error vs output error.

For 16 block linears (q/o/up/down projections of layers 0, 5, 15 and 25) of the float model and
of its Hadamard-rotated copy, round to nearest at w3-g128 and measure

- the relative weight error ``‖ΔW‖² / ‖W‖²`` (what SQNR reports), and
- the relative output error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``, ``H`` the input covariance of the
  module on 4 x 256 calibration tokens (what the layer's outputs feel),

plus the share of ``tr(H)`` in the top 1 % of input channels, the post-attention RMSNorm weights
of those layers (the up projections' inputs pass through them), and the residual channels with
the largest activations entering that norm with the norm's weight on each. No evaluation windows are
read: this is an analysis, not a quality figure.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/rotation_error.py

Writes benchmarks/results/rotation_error.json.
"""
from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine  # noqa: E402

from uqcit.inputs.calibration import collect_input_stats  # noqa: E402
from uqcit.inputs.corpus import calibration_batch  # noqa: E402
from uqcit.inputs.models import load_model  # noqa: E402
from uqcit.stages.rotation import RotationConfig, rotate_model  # noqa: E402
from uqcit.tensor.formats import parse_format  # noqa: E402
from uqcit.tensor.quant import dequantize, quantize  # noqa: E402

LAYERS = (0, 5, 15, 25)
KINDS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
FORMAT = "w3-g128"


def errors(model, batch, names: list[str]) -> list[dict]:
    """Relative weight and output error of round-to-nearest, per module."""
    stats = collect_input_stats(model, batch, names, hessian=True, progress=False)
    modules = dict(model.named_modules())
    rows = []
    for n in names:
        w = modules[n].weight.detach().float()
        h = stats[n].hessian.float()
        d = dequantize(quantize(w, parse_format(FORMAT))) - w
        diag = torch.diagonal(h)
        top = diag.topk(max(1, diag.numel() // 100)).values.sum() / diag.sum()
        rows.append({"module": n, "weight_rel_err": float((d ** 2).sum() / (w ** 2).sum()),
                     "output_rel_err": float(torch.einsum("oi,ij,oj->", d, h, d) / torch.einsum("oi,ij,oj->", w, h, w)),
                     "top1pct_channel_share": float(top)})
    return rows


def massive_channels(model, ids: torch.Tensor) -> list[dict]:
    """Per layer: the residual channels with the largest RMS entering the post-attention norm, and
    the norm's weight on each (a weight near zero switches the channel off inside the norm)."""
    inputs: dict[int, torch.Tensor] = {}
    hooks = [model.model.layers[b].post_attention_layernorm.register_forward_hook(
        lambda mod, args, out, b=b: inputs.__setitem__(b, args[0].detach())) for b in LAYERS]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for b in LAYERS:
        rms = inputs[b].reshape(-1, inputs[b].shape[-1]).pow(2).mean(0).sqrt()
        gamma = model.model.layers[b].post_attention_layernorm.weight.detach().abs()
        rows.append({"layer": b, "median_rms": float(rms.median()),
                     "largest": [{"channel": int(i), "rms": float(rms[i]), "norm_weight": float(gamma[i])}
                                 for i in rms.topk(3).indices]})
    return rows


def main() -> None:
    loaded = load_model("smollm2-135m")
    ref, tok = loaded.model, loaded.tokenizer
    batch = calibration_batch(tok, n_samples=4, seq_len=256, seed=0)
    rotated = rotate_model(ref, RotationConfig(construction="hadamard"), check_ids=batch[:1, :64]).model
    names = [f"model.layers.{b}.{k}" for b in LAYERS for k in KINDS]
    out = {"model": "smollm2-135m", "format": FORMAT, "calibration": "4 x 256 lee_background tokens",
           "plain": errors(ref, batch, names), "hadamard": errors(rotated, batch, names),
           "post_attention_norm": [
               {"layer": b, **{k: float(getattr(g, k)()) for k in ("min", "median", "max")}}
               for b in LAYERS for g in [ref.model.layers[b].post_attention_layernorm.weight.detach().abs()]],
           "massive_channels": massive_channels(ref, batch[:1, :128]),
           "machine": machine(), "date": datetime.date.today().isoformat()}
    for key in ("plain", "hadamard"):
        rows = out[key]
        out[f"{key}_mean"] = {m: sum(r[m] for r in rows) / len(rows) for m in ("weight_rel_err", "output_rel_err")}
    (RESULTS / "rotation_error.json").write_text(json.dumps(out, indent=2) + "\n")
    for key in ("plain", "hadamard"):
        print(key, out[f"{key}_mean"])
        for r in out[key]:
            print(f"  {r['module']:34s} weight {r['weight_rel_err']:.4f}  output {r['output_rel_err']:.4f}  "
                  f"top-1% channels {r['top1pct_channel_share']:.2f}")


if __name__ == "__main__":
    main()

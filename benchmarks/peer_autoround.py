"""AutoRound (Intel's ``auto-round`` package) measured as a peer on this protocol, news and code.

The peers' figures in docs/evaluation.md were measured on news only. This script measures the
AutoRound-light settings again (SignRound, 50 steps, 64 x 256 calibration tokens of lee_background
after the evaluation span, block linears only, the tied embedding/head at fp16) and scores the
result on both held-out texts, so the workbench's code-text figures have a peer beside them.

``auto-round`` pins its own transformers, so it runs in an environment of its own; three steps:

    .venv/bin/python benchmarks/peer_autoround.py prepare DIR            # float SmolLM2 + calibration text
    AR_ENV/bin/python benchmarks/peer_autoround.py quantize DIR w4-g64-sym  # AutoRound, saved fake-quantized
    .venv/bin/python benchmarks/peer_autoround.py score DIR w4-g64-sym     # KL on news (32 w.) and code (8 w.)

(``AR_ENV``: a virtual environment with ``torch`` and ``auto-round``; the quantize step imports
nothing from the workbench.) ``score`` merges its record into benchmarks/results/peers.json.
Formats: ``w{b}-g{G}-sym`` or ``w{b}-g{G}`` (asymmetric, b-bit zero points: AutoRound's own).
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

CALIB_SAMPLES, CALIB_LEN, ITERS = 64, 256, 50  # AutoRound "light", as docs/evaluation.md's peers


def _format(name: str) -> tuple[int, int, bool]:
    m = re.fullmatch(r"w(\d)-g(\d+)(-sym)?", name)
    if not m:
        raise SystemExit(f"format {name!r}: expected w{{b}}-g{{G}} or w{{b}}-g{{G}}-sym")
    return int(m.group(1)), int(m.group(2)), bool(m.group(3))


def prepare(root: Path) -> None:
    from uqcit.inputs.corpus import calibration_batch
    from uqcit.inputs.models import load_model

    loaded = load_model("smollm2-135m", progress=False)
    loaded.model.save_pretrained(root / "float")
    loaded.tokenizer.save_pretrained(root / "float")
    # A few tokens more than the sequence length: AutoRound re-tokenizes and drops shorter texts.
    ids = calibration_batch(loaded.tokenizer, n_samples=CALIB_SAMPLES, seq_len=CALIB_LEN + 16, seed=0)
    texts = [loaded.tokenizer.decode(row.tolist()) for row in ids]
    (root / "calibration.json").write_text(json.dumps(texts))
    print(f"{root}/float and {len(texts)} calibration texts written")


def quantize(root: Path, fmt: str) -> None:
    import shutil

    import torch
    from auto_round import AutoRound
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bits, group, sym = _format(fmt)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(root / "float", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(root / "float")
    texts = json.loads((root / "calibration.json").read_text())
    t0 = time.perf_counter()
    ar = AutoRound(model, tok, bits=bits, group_size=group, sym=sym, iters=ITERS, nsamples=CALIB_SAMPLES,
                   seqlen=CALIB_LEN, dataset=texts, device_map="cpu")
    # quantize() leaves each block linear's weight fake-quantized in place (its fp16 scales beside
    # it). Its own "fake" export writes the float originals back (auto-round 0.16 re-quantizes at
    # load time), so the weights are saved here as they are after quantize().
    quantized, _ = ar.quantize()
    seconds = time.perf_counter() - t0
    out = root / fmt
    out.mkdir(parents=True, exist_ok=True)
    for f in (root / "float").iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    state = {k: v.detach().contiguous().clone() for k, v in quantized.state_dict().items()
             if k != "lm_head.weight"}  # tied to the embedding
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    import auto_round
    (out / "peer.json").write_text(json.dumps({"seconds": seconds,
                                                      "auto_round": auto_round.__version__,
                                                      "threads": torch.get_num_threads()}))
    print(f"{out}: {seconds:.0f} s")


def score(root: Path, fmt: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from transformers import AutoModelForCausalLM

    from common import merge, record
    from uqcit.inputs.models import load_model
    from uqcit.stages.evaluate import EvalConfig, evaluate_many
    from uqcit.tensor.formats import parse_format

    bits, group, sym = _format(fmt)
    loaded = load_model("smollm2-135m", progress=False)
    ref, tok = loaded.model, loaded.tokenizer
    model = AutoModelForCausalLM.from_pretrained(root / fmt, dtype=torch.float32).eval()
    peer = json.loads((root / fmt / "peer.json").read_text())
    key = "model.layers.0.self_attn.q_proj.weight"
    if torch.equal(model.state_dict()[key], ref.state_dict()[key]):
        raise SystemExit(f"{root / fmt}: the block weights are the float model's; nothing was quantized")
    # Peer accounting: b-bit codes, an fp16 scale and (asymmetric) a b-bit zero point per group.
    fmt_bits = parse_format(f"w{bits}-g{group}" + ("-sym" if sym else "-iz"))
    name = f"autoround-light-w{bits}-g{group}" + ("-sym" if sym else "")
    news = evaluate_many({name: model}, tok, EvalConfig(), reference=ref)
    code = evaluate_many({name: model}, tok, EvalConfig(corpus="humaneval", total_tokens=31 * 1024, max_windows=8),
                         reference=ref)
    ev = news[name]
    rec = record(model="smollm2-135m", method=name, bpw=None, package_bytes=None, ev=ev,
                 seconds={"quantize": peer["seconds"], "evaluate": ev.seconds},
                 bpw_blocks=fmt_bits.bits_per_weight(576 * 576), accounting="peer",
                 reference_ppl=news["reference"].ppl, peer={**peer, "iters": ITERS, "calib": [CALIB_SAMPLES, CALIB_LEN]},
                 second_text={"corpus": "humaneval", "windows": code[name].windows, "kl": code[name].kl,
                              "ppl": code[name].ppl, "top1": code[name].top1})
    merge("peers", [rec])
    print(f"{name}: KL news {ev.kl:.4f} (ppl {ev.ppl:.2f}), KL code {code[name].kl:.4f}")


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("prepare", "quantize", "score"):
        raise SystemExit(__doc__)
    root = Path(sys.argv[2])
    if sys.argv[1] == "prepare":
        prepare(root)
    else:
        (quantize if sys.argv[1] == "quantize" else score)(root, sys.argv[3])

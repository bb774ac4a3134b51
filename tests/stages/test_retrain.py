import copy

import pytest
import torch
from torch import nn

from uqcit.stages import retrain as rt
from uqcit.stages.quantize import quantize_model
from uqcit.stages.levels import analyze_levels
from uqcit.stages.plan import BitPlan, PlanConfig, build_plan
from uqcit.tensor.formats import parse_format
from uqcit.stages.retrain import (LoRALinear, RetrainConfig, ScaleTrainableLinear, banned_tokens, prepare_trainable,
                           retrain, self_generate)
from uqcit.runtime.modules import QuantLinear
from uqcit.inputs.tiny import tiny_model

# Small everywhere: byte-level tiny models, short sequences. Prompts are short so seq_len can be.
PROMPTS = ("The cat", "In 1990,", "def f(x):")
SMALL = RetrainConfig(n_sequences=8, heldout_sequences=4, seq_len=32, prompts=PROMPTS, gen_batch=4,
                      batch_size=4, steps_per_window=1, epochs=2)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return tiny_model("llama")


@pytest.fixture(scope="module")
def quantized(llama):
    model, _ = llama
    levels = analyze_levels(model)
    return quantize_model(model, levels, build_plan(levels, PlanConfig(preset="uniform", bits=3, group_size=32)),
                          progress=False)


@pytest.fixture(scope="module")
def text(llama):
    model, tok = llama
    return self_generate(model, tok, n_sequences=12, seq_len=32, prompts=PROMPTS, batch=4, seed=0, progress=False)


def _stored(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_self_generated_text_is_seeded_and_continues_its_prompts(llama, text):
    model, tok = llama
    again = self_generate(model, tok, n_sequences=12, seq_len=32, prompts=PROMPTS, batch=4, seed=0, progress=False)
    other = self_generate(model, tok, n_sequences=12, seq_len=32, prompts=PROMPTS, batch=4, seed=1, progress=False)
    assert text.ids.shape == (12, 32)
    assert torch.equal(text.ids, again.ids)
    assert not torch.equal(text.ids, other.ids)
    from uqcit.inputs.corpus import encode

    for row, n, pi in zip(text.ids, text.prompt_lengths, text.prompt_index):
        assert torch.equal(row[:n], encode(tok, PROMPTS[pi]))
    assert text.generated_tokens == 12 * 32 - int(text.prompt_lengths.sum())
    banned = banned_tokens(model, tok)
    assert banned and not torch.isin(text.ids, torch.tensor(banned)).any()
    with pytest.raises(ValueError, match="leaves nothing to generate"):
        self_generate(model, tok, n_sequences=1, seq_len=4, prompts=("a long prompt",), progress=False)


def test_scale_wrapper_computes_the_stored_module_exactly(llama, quantized):
    model, _ = llama
    student = copy.deepcopy(quantized.model)
    trainables, skipped = prepare_trainable(student, RetrainConfig(mode="scales"))
    assert all(isinstance(student.get_submodule(t.name), ScaleTrainableLinear) for t in trainables)
    assert ("lm_head" in dict(skipped)) and "shared" in dict(skipped)["lm_head"]  # tied to the embedding
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert torch.equal(student(input_ids=ids).logits, quantized.model(input_ids=ids).logits)
    assert [p for p in student.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="found nothing to train.*QuantLinear"):
        prepare_trainable(copy.deepcopy(model), RetrainConfig(mode="scales"))


def test_scales_retraining_changes_only_fp16_scales_and_trains_what_is_stored(llama, quantized, text):
    model, tok = llama
    before = _stored(quantized.model)
    cfg = SMALL.replace(gate=False, lr=1e-2)
    res = retrain(quantized.model, model, tok, cfg, data=text, progress=False)
    after = res.model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(v, before[k]) for k, v in quantized.model.state_dict().items())  # input untouched
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(".scales") for k in changed)
    assert all(after[k].dtype == torch.float16 for k in changed)
    assert all(isinstance(res.model.get_submodule(t.name), QuantLinear) for t in res.trainables)
    assert res.extra_bits == 0 and res.windows == res.kept == 4  # 8 sequences / 4 per step × 2 epochs
    # The model trained on is the model stored: S of the returned model equals the logged S.
    held = text.ids[torch.randperm(12, generator=torch.Generator().manual_seed(cfg.seed + 1))[8:]]
    ref = rt._reference_logprobs(model, held)
    assert rt._gate_value(res.model, held, ref) == pytest.approx(res.log[-1].s, rel=1e-5)


def test_double_quantized_scales_train_as_their_codes(llama, text):
    # -s<k> formats store k-bit scale codes under fp16 super-scales: training moves the codes, the
    # super-scales and everything else stay, and the model trained on is the model stored.
    model, tok = llama
    levels = analyze_levels(model)
    plan = BitPlan(default=parse_format("w4-g32-sym-s6"), name="s6")
    q = quantize_model(model, levels, plan, progress=False)
    before = _stored(q.model)
    cfg = SMALL.replace(gate=False, lr=5e-2)
    res = retrain(q.model, model, tok, cfg, data=text, progress=False)
    after = res.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(".scale_codes") for k in changed)
    held = text.ids[torch.randperm(12, generator=torch.Generator().manual_seed(cfg.seed + 1))[8:]]
    ref = rt._reference_logprobs(model, held)
    assert rt._gate_value(res.model, held, ref) == pytest.approx(res.log[-1].s, rel=1e-5)
    assert res.log[-1].s < res.s0


@pytest.mark.parametrize("name", ["w3-g32-lut", "w4-g32-nl"])
def test_lookup_table_layers_train_their_scales_and_tables(llama, text, name):
    # -lut trains its scales and its fitted table, -nl its signed scales (its table is IQ4_NL's):
    # nothing but the lm head (tied to the embedding) is skipped, the held-out KL falls, and the
    # model trained on is the model stored.
    model, tok = llama
    levels = analyze_levels(model)
    q = quantize_model(model, levels, BitPlan(default=parse_format(name), name=name), progress=False)
    before = _stored(q.model)
    cfg = SMALL.replace(gate=False, lr=1e-2)
    res = retrain(q.model, model, tok, cfg, data=text, progress=False)
    assert [n for n, _ in res.skipped] == ["lm_head"] and "shared" in dict(res.skipped)["lm_head"]
    assert res.trainables and all(isinstance(res.model.get_submodule(t.name), QuantLinear) for t in res.trainables)
    assert all(res.model.get_submodule(t.name).fmt.name == name for t in res.trainables)
    after = res.model.state_dict()
    changed = {k.rsplit(".", 1)[1] for k in before if not torch.equal(before[k], after[k])}
    assert "scales" in changed and changed <= {"scales", "table", "codes"}  # codes: renumbered crossing levels
    assert ("table" in changed) == name.endswith("-lut")
    for t in res.trainables:
        m = res.model.get_submodule(t.name)
        assert m.scales.dtype == m.table.dtype == torch.float16 and bool(torch.all(m.table[1:] >= m.table[:-1]))
        if name.endswith("-nl"):
            assert torch.equal(m.scales.sign(), before[t.name + ".scales"].sign())
    held = text.ids[torch.randperm(12, generator=torch.Generator().manual_seed(cfg.seed + 1))[8:]]
    ref = rt._reference_logprobs(model, held)
    assert rt._gate_value(res.model, held, ref) == pytest.approx(res.log[-1].s, rel=1e-5)
    assert res.log[-1].s < res.s0 and res.log[-1].train_loss < res.log[0].train_loss


def test_gate_rolls_back_rejected_windows_exactly(llama, quantized, text, tmp_path):
    model, tok = llama
    # KL is never below 0: a threshold of 0 rejects every window, so nothing may change, and the
    # optimizer state must be rolled back too (the checkpoint then holds none).
    ckpt = tmp_path / "all-rejected.safetensors"
    res = retrain(quantized.model, model, tok, SMALL.replace(gate_threshold=0.0, lr=1e-2, checkpoint=str(ckpt)),
                  data=text, progress=False)
    assert res.kept == 0 and res.rejected == res.windows == 4
    assert res.final_s == res.s0
    assert all(torch.equal(v, quantized.model.state_dict()[k]) for k, v in res.model.state_dict().items())
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="pt") as f:
        assert not [k for k in f.keys() if k.startswith("opt.")]
        assert any(k.startswith("param.") for k in f.keys())


def test_gate_keeps_a_window_only_under_its_threshold(llama, quantized, text):
    model, tok = llama
    on = retrain(quantized.model, model, tok, SMALL.replace(lr=0.3, gate_epsilon=0.0), data=text, progress=False)
    off = retrain(quantized.model, model, tok, SMALL.replace(lr=0.3, gate=False), data=text, progress=False)
    best = on.s0
    for r in on.log:
        assert r.threshold == pytest.approx(best)
        assert r.kept == (r.s <= r.threshold)
        if r.kept:
            best = min(best, r.s)
    assert on.final_s <= on.s0
    assert off.kept == off.windows and off.rejected == 0
    # Identical until the first rejection: the gate is the only difference between the runs.
    first = next((i for i, r in enumerate(on.log) if not r.kept), len(on.log))
    assert [r.s for r in on.log[:first + 1]] == pytest.approx([r.s for r in off.log[:first + 1]])
    assert "rejected" in on.summary() and on.figure().data


def test_masked_mode_keeps_pruned_weights_exactly_zero(llama, text):
    from uqcit.stages.prune import MaskedLinear, PruneConfig, prune_model

    model, tok = llama
    pruned = prune_model(model, analyze_levels(model), PruneConfig(method="magnitude", kept_fraction=0.5),
                         progress=False).model
    res = retrain(pruned, model, tok, SMALL.replace(mode="masked", gate=False, lr=1e-2), data=text, progress=False)
    masked = {n: m for n, m in res.model.named_modules() if isinstance(m, MaskedLinear)}
    assert masked and len(res.trainables) == len(masked)
    moved = 0
    for name, m in masked.items():
        assert torch.equal(m.mask, pruned.get_submodule(name).mask)
        assert not m.weight[~m.mask].any()  # exactly zero where pruned
        moved += int((m.weight[m.mask] != pruned.get_submodule(name).weight[m.mask]).sum())
    assert moved > 0
    assert res.trainable_values == sum(int(m.mask.sum()) for m in masked.values())


class _StandIn(nn.Linear):
    """Any module with a weight parameter and a bool mask buffer, whose forward does not apply it."""

    def __init__(self, lin: nn.Linear, mask: torch.Tensor):
        super().__init__(lin.in_features, lin.out_features, bias=lin.bias is not None)
        self.load_state_dict(lin.state_dict())
        self.register_buffer("mask", mask)


def test_masked_mode_works_on_any_module_with_a_mask_buffer(llama, text):
    model, tok = llama
    pruned = copy.deepcopy(model)
    name = "model.layers.0.mlp.up_proj"
    lin = pruned.get_submodule(name)
    mask = torch.rand(lin.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    from uqcit.runtime.modules import replace_module

    replace_module(pruned, name, _StandIn(lin, mask))
    res = retrain(pruned, model, tok, SMALL.replace(mode="masked", gate=False, lr=1e-2), data=text, progress=False)
    m = res.model.get_submodule(name)
    assert [t.name for t in res.trainables] == [name]
    assert not m.weight[~mask].any() and not torch.equal(m.weight[mask], lin.weight[mask])
    with pytest.raises(ValueError, match="found nothing to train.*mask"):
        retrain(model, model, tok, SMALL.replace(mode="masked"), data=text, progress=False)


def test_lora_adapters_start_neutral_are_counted_and_stored_fp16(llama, quantized, text):
    model, tok = llama
    student = copy.deepcopy(quantized.model)
    cfg = SMALL.replace(mode="lora", lora_rank=4, gate=False, lr=1e-2)
    trainables, skipped = prepare_trainable(student, cfg)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert torch.equal(student(input_ids=ids).logits, quantized.model(input_ids=ids).logits)
    assert "lm_head" in dict(skipped)
    res = retrain(quantized.model, model, tok, cfg, data=text, progress=False)
    adapters = [m for m in res.model.modules() if isinstance(m, LoRALinear)]
    assert len(adapters) == len(res.trainables) == len(trainables)
    assert res.extra_bits == sum(16 * 4 * (a.in_features + a.out_features) for a in adapters)
    assert all(a.lora_A.dtype == a.lora_B.dtype == torch.float16 for a in adapters)
    assert any(a.lora_B.any() for a in adapters)


def test_lora_adapters_export_as_low_rank_compensation(llama, quantized, text, tmp_path):
    from uqcit.package import export_package, load_package

    model, tok = llama
    res = retrain(quantized.model, model, tok, SMALL.replace(mode="lora", lora_rank=4, gate=False, lr=1e-2),
                  data=text, progress=False)
    out = res.apply_to(quantized)
    assert not any(isinstance(m, LoRALinear) for m in out.model.modules())
    assert any(isinstance(m, LoRALinear) for m in res.model.modules())  # the result itself is untouched
    assert out.stored_bits == quantized.stored_bits + res.extra_bits
    assert out.bpw > quantized.bpw
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        trained = res.model(input_ids=ids).logits
        assert torch.allclose(out.model(input_ids=ids).logits, trained, atol=1e-4)
        loaded = load_package(export_package(out, tok, tmp_path / "lora", source_model="tiny-llama")).model
        assert torch.allclose(loaded(input_ids=ids).logits, trained, atol=1e-4)
        assert not torch.allclose(loaded(input_ids=ids).logits, quantized.model(input_ids=ids).logits, atol=1e-3)

    float_lora = retrain(model, model, tok, SMALL.replace(mode="lora", lora_rank=2, epochs=1), data=text,
                         progress=False)
    with pytest.raises(ValueError, match="only adapters on quantized layers"):
        float_lora.apply_to(quantized)


def test_checkpoint_resumes_to_the_same_result(llama, quantized, text, tmp_path, monkeypatch):
    model, tok = llama
    cfg = SMALL.replace(lr=0.05, gate_epsilon=0.01)
    whole = retrain(quantized.model, model, tok, cfg, data=text, progress=False)

    ckpt = tmp_path / "run.safetensors"
    calls = {"n": 0}
    real = rt._gate_value

    def stop_after_two_windows(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # S(0), windows 1 and 2, then stop inside window 3
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(rt, "_gate_value", stop_after_two_windows)
    with pytest.raises(KeyboardInterrupt):
        retrain(quantized.model, model, tok, cfg.replace(checkpoint=str(ckpt)), data=text, progress=False)
    monkeypatch.setattr(rt, "_gate_value", real)
    resumed = retrain(quantized.model, model, tok, cfg.replace(checkpoint=str(ckpt)), progress=False)
    assert [(r.s, r.kept) for r in resumed.log] == [(r.s, r.kept) for r in whole.log]
    assert all(torch.equal(v, whole.model.state_dict()[k]) for k, v in resumed.model.state_dict().items())
    with pytest.raises(ValueError, match="other settings"):
        retrain(quantized.model, model, tok, cfg.replace(checkpoint=str(ckpt), lr=0.01), progress=False)


def test_config_checks_and_pipeline_stage(llama):
    with pytest.raises(ValueError, match="seq_len"):
        RetrainConfig(seq_len=1)
    with pytest.raises(ValueError, match=">= 1"):
        RetrainConfig(batch_size=0)
    assert RetrainConfig.from_json(SMALL.to_json()) == SMALL

    from uqcit.stages.levels import LevelsConfig
    from uqcit.pipeline import Session
    from uqcit.stages.quantize import QuantizeConfig

    model, tok = llama
    s = Session(name="tiny-llama", reference=model, tokenizer=tok, progress=False)
    with pytest.raises(RuntimeError, match="needs a compressed model"):
        s.run_stage(SMALL)
    s.run_stage(LevelsConfig())
    s.run_stage(PlanConfig(preset="uniform", bits=3, group_size=32))
    q = s.run_stage(QuantizeConfig())
    r = s.run_stage(SMALL.replace(epochs=1))
    assert s.compressed is r.model and r.model is not q.model
    assert r.apply_to(q).model is r.model and r.apply_to(q).bpw == q.bpw


def test_main_job_exports_the_retrained_model(llama, tmp_path):
    from uqcit.stages.quantize import QuantizeConfig
    from uqcit.stages.evaluate import EvalConfig
    from uqcit.stages.levels import LevelsConfig
    from uqcit.package import load_package
    from uqcit.pipeline import Session, run_job
    from uqcit.recipe import Recipe

    model, tok = llama
    recipe = Recipe("rtn3-retrain", (LevelsConfig(), PlanConfig(preset="uniform", bits=3, group_size=32),
                                     QuantizeConfig(), SMALL.replace(epochs=1, gate=False, lr=1e-2)))
    assert Recipe.from_json(recipe.to_json()) == recipe
    s = Session(name="tiny-llama", reference=model, tokenizer=tok, progress=False)
    run_job("tiny-llama", recipe, tmp_path / "pkg", eval_config=EvalConfig(max_windows=1, window=128, total_tokens=1024),
            progress=False, session=s)
    stored = load_package(tmp_path / "pkg", progress=False).model.state_dict()
    retrained, quantized = s.results["retrain"].model.state_dict(), s.results["quantize"].model.state_dict()
    scales = [k for k in retrained if k.endswith(".scales") and not torch.equal(retrained[k], quantized[k])]
    assert scales and all(torch.equal(stored[k], retrained[k]) for k in scales)


@pytest.mark.slow
def test_scales_retraining_runs_on_smollm2(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    levels = analyze_levels(model)
    q = quantize_model(model, levels, build_plan(levels, PlanConfig(preset="uniform", bits=3)), progress=False)
    cfg = RetrainConfig(n_sequences=2, heldout_sequences=1, seq_len=16, prompts=("The city",), gen_batch=3,
                        batch_size=2, steps_per_window=1, gate=False)
    student = copy.deepcopy(q.model)
    prepare_trainable(student, cfg)
    ids = torch.tensor([[504, 3575, 314, 253, 1345, 28, 357]])
    with torch.no_grad():
        # QuantLinear runs decode-sized inputs (<= 16 rows) through the packed kernel, which sums in
        # another order than the de-quantized path the trainable wrapper takes: equal to float32 rounding.
        torch.testing.assert_close(student(input_ids=ids).logits, q.model(input_ids=ids).logits,
                                   atol=1e-3, rtol=1e-4)
    res = retrain(q.model, model, tok, cfg, progress=False)
    assert res.data.ids.shape == (3, 16) and res.windows == 1
    assert len(res.trainables) == 210 and [n for n, _ in res.skipped] == ["lm_head"]
    changed = [k for k, v in res.model.state_dict().items() if not torch.equal(v, q.model.state_dict()[k])]
    assert changed and all(k.endswith(".scales") for k in changed)


def test_linear_step_decay_sets_each_step_and_changes_the_result(llama, quantized, text, monkeypatch):
    import dataclasses

    model, tok = llama
    cfg = dataclasses.replace(SMALL, lr=0.01, lr_decay="linear", gate=False)
    seen = []
    step = rt._train_step

    def spy(student, original, ids, params, masks, optimizer, config):
        seen.append(optimizer.param_groups[0]["lr"])
        return step(student, original, ids, params, masks, optimizer, config)

    monkeypatch.setattr(rt, "_train_step", spy)
    decayed = retrain(quantized.model, model, tok, cfg, data=text, progress=False)
    total = 2 * 8 // 4  # epochs x sequences / batch
    assert seen == pytest.approx([0.01 * (1 - k / total) for k in range(total)])
    monkeypatch.setattr(rt, "_train_step", step)
    constant = retrain(quantized.model, model, tok, dataclasses.replace(cfg, lr_decay="constant"), data=text,
                       progress=False)
    assert [r.s for r in decayed.log] != [r.s for r in constant.log]
    with pytest.raises(Exception, match="lr_decay"):
        RetrainConfig(lr_decay="cosine")

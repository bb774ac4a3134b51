"""Vector codebook formats (``w{b}-g{G}-vq{d}``, ``uqcit.tensor.vq``): names and bits, the k-means fit
against lut's table, encoding, GPTQ with vectors, packages, scale training, and the readers and
learned rounding that refuse them. (Export refusals: tests/export; the packed kernel: tests/runtime.)"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from uqcit.tensor import vq
from uqcit.tensor.formats import QuantFormat, parse_format
from uqcit.tensor.gptq import gptq_quantize, hessian_error
from uqcit.tensor.learned import LearnedTable, LearnedVQ, LearnedWeight, learned_weight
from uqcit.tensor.lut import absmax_scales, normalized
from uqcit.tensor.quant import (
    codes_of,
    dequantize,
    dequantize_at,
    quant_params,
    quantize,
    scales_of,
    tensor_layout,
    zero_points,
)

from tensor_helpers import gen as _gen, hessian as _hessian, same_tensors, student_t

NAMES = ["w2-g64-vq2", "w3-g32-vq2", "w4-g32-vq2", "w2-g64-vq4", "w2-g12-vq4"]


def normalized_error(w: torch.Tensor, q, weight: torch.Tensor | None = None) -> float:
    """The fit's objective: ``sum weight * (u - u_hat)**2`` of the group-normalized weights."""
    flat = w.reshape(-1).float()
    s = absmax_scales(flat, q.fmt.group_size).float().repeat_interleave(q.fmt.group_size)[:flat.numel()]
    err = ((dequantize(q).reshape(-1) - flat) / s).double().square()
    return float(err.sum() if weight is None else (err * weight.reshape(-1).double()).sum())


# ------------------------------------------------------------------------------ names and bits


@pytest.mark.parametrize("name", NAMES)
def test_names_round_trip_and_metadata(name):
    fmt = parse_format(name)
    assert fmt.vq in (2, 4) and fmt.symmetric and not fmt.lut and not fmt.mixed and fmt.scale_bits is None
    assert fmt.name == name and QuantFormat.from_dict(fmt.to_dict()) == fmt and fmt.to_dict()["vq"] == fmt.vq
    assert QuantFormat(bits=fmt.bits, group_size=fmt.group_size, vq=fmt.vq) == fmt  # one spelling: symmetric
    assert "vq" not in parse_format("w4-g32-sym").to_dict() and "vq" not in parse_format("w4-g32-lut").to_dict()


@pytest.mark.parametrize("kw,match", [
    (dict(bits=3, vq=4), "vq2 takes bits 2, 3 or 4 and vq4 bits 2"),
    (dict(bits=5, vq=2), "vq2 takes bits 2, 3 or 4"),
    (dict(bits=16, vq=2), "vq2 takes bits"),
    (dict(vq=3), r"one of \(2, 4\)"),
    (dict(vq=True), r"one of \(2, 4\)"),
    (dict(high_bits=16, high_fraction=0.1), r"no high-precision part \(high_bits\)"),
    (dict(int_zeros=True), r"no zero points \(int_zeros\)"),
    (dict(scale_bits=6), r"no double-quantized scales \(scale_bits\)"),
    (dict(lut=True), r"no scalar lookup table \(lut\)"),
    (dict(bits=4, lut=True, nl=True), r"no IQ4_NL table \(nl\)"),
    (dict(group_size=30, vq=4), "group_size must be a multiple of vq=4"),
])
def test_combinations_that_are_no_vq_format_are_refused_in_one_line(kw, match):
    with pytest.raises(ValueError, match=match) as err:
        QuantFormat(**{**dict(bits=2, group_size=64, vq=2), **kw})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["w2-g64-vq3", "w3-g64-vq4", "w2-g30-vq4", "w2-g64-sym-vq2", "w2-g64-vq2-lut"])
def test_names_that_are_no_vq_format_are_refused(name):
    with pytest.raises(ValueError):
        parse_format(name)


@pytest.mark.parametrize("name,shape,bits", [
    # codes (d * b bits per vector) + one fp16 scale a group + 2**(d*b) points of d fp16 coordinates
    ("w2-g64-vq4", (64, 96), 1536 * 8 + 96 * 16 + 256 * 4 * 16),  # 30208
    ("w4-g32-vq2", (64, 96), 3072 * 8 + 192 * 16 + 256 * 2 * 16),  # 35840
    ("w3-g32-vq2", (10, 10), 38 * 8 + 4 * 16 + 64 * 2 * 16),  # 50 codes of 6 bits in 38 bytes
    ("w2-g12-vq4", (11, 37), 102 * 8 + 34 * 16 + 256 * 4 * 16),  # a short last vector (3) and group (11)
    ("w2-g64-vq2", (3, 7), 6 * 8 + 1 * 16 + 16 * 2 * 16),  # 11 codes of 4 bits (the last short) in 6 bytes
])
def test_bits_stored_are_counted_by_hand(name, shape, bits):
    fmt = parse_format(name)
    q = quantize(torch.randn(*shape, generator=_gen(0)), fmt)
    numel = math.prod(shape)
    assert q.stored_bits == fmt.bits_for(numel) == bits
    assert sorted(q.tensors) == sorted(tensor_layout(numel, fmt)) == ["codes", "scales", "table"]
    assert q.tensors["table"].dtype == q.tensors["scales"].dtype == torch.float16
    assert q.tensors["table"].numel() == fmt.vq << (fmt.vq * fmt.bits)
    assert codes_of(q)["codes"].numel() == math.ceil(numel / fmt.vq)


def test_w2_g64_vq4_costs_2_25_bits_and_its_codebook():
    fmt = parse_format("w2-g64-vq4")
    numel = 1536 * 576  # SmolLM2's MLP matrices
    assert fmt.bits_per_weight(numel) == 2.25 + 16 * 4 * 256 / numel


# ------------------------------------------------------------------------------ fit and encoding


def test_the_start_is_lut_and_encodes_exactly_its_weights():
    # The product of lut's levels: its nearest point is the nearest level, coordinate by coordinate.
    w = student_t((32, 96), 4, 2)
    for b, d in ((2, 2), (3, 2), (2, 4)):
        lut = quantize(w, parse_format(f"w{b}-g32-lut"))
        flat = w.reshape(-1)
        grid = vq.vq_grid(flat, b, 32, d, iters=0)
        assert torch.equal(grid.table, vq.product_table(lut.tensors["table"], d))
        stored = vq.encode_vq(flat, b, 32, d, grid)
        assert torch.equal(vq.dequantize_vq(stored, flat.numel(), b, 32, d), dequantize(lut).reshape(-1))


@pytest.mark.parametrize("kind", ["gaussian", "student-t3"])
@pytest.mark.parametrize("b,d", [(2, 2), (3, 2), (4, 2), (2, 4)])
def test_vq_is_never_worse_than_lut_at_the_same_bits(kind, b, d):
    w = 0.02 * (torch.randn(64, 256, generator=_gen(0)) if kind == "gaussian" else student_t((64, 256), 3, 1))
    lut, vec = quantize(w, parse_format(f"w{b}-g64-lut")), quantize(w, parse_format(f"w{b}-g64-vq{d}"))
    # The fit's objective (normalized weights), guaranteed. Measured, vq / lut: Gaussian 0.92 (w2, vq2),
    # 0.86 (w3), 0.86 (w4), 0.68 (w2, vq4); Student-t(3) 0.72, 0.75, 0.74, 0.49.
    assert normalized_error(w, vec) <= normalized_error(w, lut)
    mse = lambda q: float((dequantize(q) - w).double().square().mean())  # noqa: E731
    # And so is the weights' MSE, by a margin (measured: Gaussian 0.92, 0.86, 0.87, 0.68; Student-t 0.60,
    # 0.70, 0.77, 0.42).
    assert mse(vec) < 0.97 * mse(lut), (mse(vec), mse(lut))


def test_k_means_never_ends_worse_than_its_start_and_the_weighting_tells():
    w = student_t((48, 128), 3, 3).reshape(-1)
    weight = torch.exp(torch.randn(128, generator=_gen(4))).expand(48, 128).reshape(-1)
    u = normalized(w, 32, absmax_scales(w, 32))

    def objective(table: torch.Tensor, wt: torch.Tensor | None) -> float:  # brute force: every vector to its point
        vecs = u.view(-1, 2)
        dist = (vecs[:, None, :] - table.float()[None]).square().sum(-1)
        err = (vecs - table.float()[dist.argmin(1)]).double().square()
        return float(err.sum() if wt is None else (err * wt.view(-1, 2).double()).sum())

    for wt in (None, weight):
        start = objective(vq.fit_codebook(u, 2, 2, wt, iters=0), wt)
        errors = [objective(vq.fit_codebook(u, 2, 2, wt, iters=k), wt) for k in (1, 2, 5, 30)]
        assert all(e <= start for e in errors) and errors[-1] < 0.95 * start, (start, errors)
    assert not torch.equal(vq.fit_codebook(u, 2, 2, weight), vq.fit_codebook(u, 2, 2))


def test_a_point_no_vector_chooses_stays_where_it_started():
    # Four tight clusters of pairs, each near the diagonal point of its own level: the product's twelve
    # other points are nobody's nearest, and the four move to the clusters' means.
    centers = torch.tensor([[-0.8, -0.7], [-0.2, -0.1], [0.3, 0.4], [0.8, 0.9]])
    pairs = centers.repeat(500, 1) + 0.01 * torch.randn(2000, 2, generator=_gen(5))
    u = pairs.reshape(-1)
    start, fit = vq.fit_codebook(u, 2, 2, iters=0), vq.fit_codebook(u, 2, 2)
    diagonal = torch.tensor([5 * i for i in range(4)])  # code i + 4 i: level i in both coordinates
    others = torch.ones(16, dtype=torch.bool)
    others[diagonal] = False
    assert set(vq.encode_vectors(u, fit, 2).tolist()) == set(diagonal.tolist())
    assert torch.equal(fit[others], start[others])
    assert torch.allclose(fit[diagonal].float(), centers, atol=2e-3)
    assert not torch.allclose(start[diagonal].float(), centers, atol=0.02)


def test_nearest_points_by_block_is_the_brute_force_nearest(monkeypatch):
    u = torch.randn(1000, 4, generator=_gen(6))
    table = torch.randn(64, 4, generator=_gen(7)).to(torch.float16)
    brute = ((u[:, None, :] - table.float()[None]).square().sum(-1)).argmin(1)
    monkeypatch.setattr(vq, "CHUNK", 7)  # blocks that do not divide the vectors
    assert torch.equal(vq.nearest_points(u, table), brute)
    twin = torch.cat([table, table])  # a tie: the lower code
    assert int(vq.nearest_points(u, twin).max()) < 64


@pytest.mark.parametrize("name,shape", [("w3-g32-vq2", (12, 64)), ("w2-g12-vq4", (11, 37)), ("w4-g30-vq2", (7, 45))])
def test_every_vector_is_stored_as_its_nearest_point(name, shape):
    fmt, d = parse_format(name), parse_format(name).vq
    w = student_t(shape, 4, 8)
    q = quantize(w, fmt)
    assert same_tensors(q, quantize(w.clone(), fmt))  # deterministic
    n = w.numel()
    scale = q.tensors["scales"].float().repeat_interleave(fmt.group_size)[:n]
    u, u_hat = w.reshape(-1) / scale, dequantize(q).reshape(-1) / scale
    pad = math.ceil(n / d) * d - n
    table = q.tensors["table"].float().view(-1, d)
    vecs = torch.cat([u, torch.zeros(pad)]).view(-1, d)
    dist = (vecs[:, None, :] - table[None]).square()
    dist[-1, :, d - pad:] = 0  # the short last vector: its own coordinates only
    best = dist.sum(-1).min(1).values
    got = (torch.cat([u - u_hat, torch.zeros(pad)]).view(-1, d)).square().sum(1)
    assert torch.allclose(got, best, rtol=1e-5, atol=1e-6)  # no point is nearer than the one stored
    index = torch.randint(0, n, (5, 11), generator=_gen(9))
    assert torch.equal(dequantize_at(q, index), dequantize(q).reshape(-1)[index])
    assert torch.equal(dequantize(quantize(torch.zeros(4, 64), fmt)), torch.zeros(4, 64))


def test_fit_inputs_are_checked():
    fmt = parse_format("w2-g32-vq2")
    with pytest.raises(ValueError, match="elements"):
        quantize(torch.randn(4, 32), fmt, table_weight=torch.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        quantize(torch.tensor([[1.0, float("nan")]]), fmt)
    with pytest.raises(ValueError, match="non-negative"):
        quantize(torch.randn(4, 32), fmt, table_weight=-torch.ones(4, 32))
    w = torch.randn(4, 64, generator=_gen(0))
    assert same_tensors(quantize(w, fmt, table_weight=torch.zeros_like(w)), quantize(w, fmt))  # no weight: plain


# ------------------------------------------------------------------------------ GPTQ


@pytest.mark.parametrize("name", ["w2-g32-vq2", "w3-g64-vq2", "w2-g32-vq4"])
def test_gptq_on_vectors_beats_rounding_to_the_nearest_point(name):
    fmt = parse_format(name)
    w, h = student_t((64, 128), 3, 7), _hessian()
    rtn = hessian_error(w, dequantize(quantize(w, fmt)), h)
    params = quant_params(w, fmt, table_weight=h.diagonal().expand_as(w))
    for act_order in (True, False):
        q = gptq_quantize(w, h, fmt, act_order=act_order)
        assert q.fmt == fmt and q.stored_bits == fmt.bits_for(w.numel())
        gptq = hessian_error(w, dequantize(q), h)
        # Measured (to nearest; act-order, without): w2-g32-vq2 0.346; 0.280, 0.281. w3-g64-vq2 0.199;
        # 0.148, 0.155. w2-g32-vq4 0.289; 0.249, 0.254 (w2-g32-lut: 0.459; 0.353, 0.367).
        assert gptq < 0.9 * rtn, (name, act_order, gptq, rtn)
        # The codebook was fitted once, on the original weights weighted by the Hessian diagonal.
        assert torch.equal(q.tensors["table"], params.low.table.reshape(-1))
        assert torch.equal(q.tensors["scales"], params.low.scales)
    assert same_tensors(gptq_quantize(w, h, fmt), gptq_quantize(w.clone(), h.clone(), fmt))


def test_gptq_vectors_without_feedback_are_the_nearest_points_and_blocks_hold_whole_vectors():
    # An identity Hessian feeds nothing back: the loop must round as quantize encodes.
    w = torch.randn(32, 64, generator=_gen(8))
    for name in ("w3-g32-vq2", "w2-g32-vq4"):
        fmt = parse_format(name)
        assert same_tensors(gptq_quantize(w, torch.eye(64), fmt), quantize(w, fmt))
        h = _hessian(64)
        # block_size 6 would cut a vector of 4: rounded down to whole vectors; the lazy updates only
        # reorder float additions, so nearly every vector keeps its code
        a = dequantize(gptq_quantize(w, h, fmt, block_size=6))
        b = dequantize(gptq_quantize(w, h, fmt, block_size=128))
        assert float((a != b).float().mean()) < 0.01
    with pytest.raises(ValueError, match="vectors of 4 consecutive columns.*method 'rtn'"):
        gptq_quantize(torch.randn(8, 66), torch.eye(66), parse_format("w2-g32-vq4"))


def test_vector_act_order_keeps_vectors_whole():
    perm = vq.vector_order(torch.tensor([0.0, 9.0, 1.0, 1.0, 0.0, 0.0, 3.0, 0.0]), 2)  # vectors' sums 9, 2, 0, 3
    assert perm.tolist() == [0, 1, 6, 7, 2, 3, 4, 5]


# ------------------------------------------------------------------------------ readers, learned rounding


def test_integer_grid_readers_refuse_vectors_and_learned_rounding_takes_them():
    w = torch.randn(8, 64, generator=_gen(0))
    q = quantize(w, parse_format("w2-g32-vq4"))
    for reader in (zero_points, scales_of):
        with pytest.raises(ValueError, match=r"scale \* table\[code\] \(uqcit.tensor.vq"):
            reader(q)
    for make in (LearnedWeight, LearnedTable):
        with pytest.raises(ValueError, match="w2-g32-vq4 on shape"):
            make(w, q.fmt)
    lv = learned_weight(w, q.fmt)
    assert isinstance(lv, LearnedVQ)
    # untrained, it stores what round to nearest stores (its distances are summed in another order: ties aside)
    start = lv.quantized()
    assert same_tensors(start, q) or float((dequantize(start) != dequantize(q)).float().mean()) < 0.01
    with torch.no_grad():
        lv.v.uniform_(-lv.reach, lv.reach, generator=_gen(1))
    for _ in range(lv.REFRESH):
        lv.clamp_(0.5)  # the candidates are searched anew on the moved weights
    moved = lv.quantized()
    assert torch.equal(dequantize(moved), lv().detach()) and not torch.equal(dequantize(moved), dequantize(start))
    lv().square().sum().backward()  # the offsets and clipping get gradients through the codebook
    assert float(lv.v.grad.abs().sum()) > 0 and float(lv.alpha.grad.abs().sum()) > 0


def test_signround_plans_vectors_as_learnable_blocks():
    from uqcit.inputs.tiny import tiny_model
    from uqcit.stages.levels import analyze_levels
    from uqcit.stages.plan import PlanConfig, build_plan
    from uqcit.stages.signround import learnable_blocks

    model, _ = tiny_model("llama")
    levels = analyze_levels(model)
    config = PlanConfig(preset="uniform", bits=4, group_size=32)
    plan = build_plan(levels, dataclasses.replace(config, overrides={"re:.*mlp.down_proj": "w2-g32-vq4"}))
    _, blocks = learnable_blocks(model, levels, plan)
    assert any(f.vq == 4 for fmts in blocks.values() for f in fmts.values())


# ------------------------------------------------------------------------------ packages and training


def test_package_with_vectors_round_trips_runs_and_is_checked(tmp_path):
    import json

    from uqcit.inputs.tiny import tiny_model
    from uqcit.package import export_package, load_package, read_metadata
    from uqcit.package.format import METADATA_FILE, PackageError
    from uqcit.runtime.modules import QuantEmbedding, QuantLinear
    from uqcit.stages.levels import analyze_levels
    from uqcit.stages.plan import PlanConfig, build_plan
    from uqcit.stages.quantize import QuantizeConfig, quantize_model

    model, tok = tiny_model("llama")
    levels = analyze_levels(model)
    plan = build_plan(levels, PlanConfig(preset="uniform", bits=4, group_size=32, symmetric=True,
                                         overrides={"re:.*": "w2-g32-vq4", "re:.*mlp.*": "w3-g32-vq2"}))
    q = quantize_model(model, levels, plan, QuantizeConfig(method="gptq", calib_samples=2, calib_seq_len=32),
                       tokenizer=tok, progress=False)
    assert {m.method for m in q.modules if m.kind == "linear" and m.tied_to is None} == {"gptq"}
    path = export_package(q, tok, tmp_path / "pkg", source_model="tiny-llama", levels=levels)
    loaded = load_package(path, progress=False)
    ids = torch.randint(0, 256, (2, 24), generator=_gen(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, q.model(input_ids=ids).logits)  # dequantize path
        step = loaded.model(input_ids=ids[:1, :1]).logits  # one token: the packed kernel where available
        torch.testing.assert_close(step, q.model(input_ids=ids[:1, :1]).logits, rtol=1e-4, atol=1e-4)
    mods = {n: m for n, m in loaded.model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    assert any(isinstance(m, QuantEmbedding) for m in mods.values())  # looked up through dequantize_at
    assert {m.fmt.name for m in mods.values()} == {"w2-g32-vq4", "w3-g32-vq2"}
    meta = read_metadata(path)
    assert meta["quantized_stored_bytes"] == q.stored_bits // 8
    # Same codes and scales as a w2-g32-lut layer would hold, but another table: refused on load.
    name = next(n for n, m in mods.items() if m.fmt.name == "w2-g32-vq4" and isinstance(m, QuantLinear))
    meta["modules"][name]["format"] = "w2-g32-lut"
    (path / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(PackageError, match=rf"{name}.table is F16 \(1024,\), the metadata's format needs F16 \(4,\)"):
        load_package(path, progress=False, verify=False)


@pytest.mark.parametrize("train_table", [True, False])
def test_scale_training_on_vectors_starts_and_ends_at_the_stored_layer(train_table):
    from uqcit.runtime.modules import QuantLinear
    from uqcit.runtime.trainable import ScaleTrainableLinear, make_trainable

    q = quantize(student_t((6, 40), 3, 30), parse_format("w2-g32-vq4"))  # 7.5 groups of 32
    lin = QuantLinear(q, torch.randn(6, generator=_gen(31)))
    t = ScaleTrainableLinear(lin, train_table=train_table)
    weight = lambda: (t.units() * t.scale().unsqueeze(1)).reshape(-1)[: t.numel]  # noqa: E731
    assert (t.table is not None) == train_table and torch.equal(weight(), dequantize(q).reshape(-1))
    with torch.no_grad():
        t.log_scale.copy_(torch.linspace(-0.3, 0.3, t.log_scale.numel()))
        if t.table is not None:
            t.table.mul_(1.1).add_(0.01)
        trained = weight().clone()
    codes = q.tensors["codes"].clone()
    stored = t.finish()
    assert stored is lin and torch.equal(stored.dequantized(torch.float32).reshape(-1), trained)
    assert torch.equal(stored.codes, codes)  # a codebook has no order to restore: the codes stay
    chosen, _ = make_trainable(torch.nn.Sequential(QuantLinear(quantize(torch.randn(8, 64), q.fmt))), "scales")
    assert chosen[0].values == 16 + 256 * 4  # 16 groups, the codebook's coordinates

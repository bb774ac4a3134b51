"""The starting point of the package docstring examples: a tiny quantized model, in one call.

>>> q, tok = tiny_quantized()
>>> q.method_name, tiny_quantized(symmetric=True)[0].method_name
('rtn-w4-g32', 'rtn-w4-g32-sym')
"""
from __future__ import annotations


def tiny_quantized(*, symmetric: bool = False):
    """A tiny random Llama (``uqcit.inputs.tiny``) rounded to nearest at 4 bits in groups of 32, and
    its tokenizer: ``(QuantizeResult, tokenizer)``, ready for ``export_package``."""
    from uqcit.inputs.tiny import tiny_model
    from uqcit.stages.levels import analyze_levels
    from uqcit.stages.plan import PlanConfig, build_plan
    from uqcit.stages.quantize import quantize_model

    model, tok = tiny_model("llama")
    levels = analyze_levels(model)
    plan = build_plan(levels, PlanConfig(preset="uniform", group_size=32, symmetric=symmetric))
    return quantize_model(model, levels, plan, progress=False), tok

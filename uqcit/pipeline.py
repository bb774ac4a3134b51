"""Run recipes: a registry from config type to stage handler, a session, and the main job.

A ``Session`` holds the reference model and every stage's result; running a
stage config looks its handler up in ``STAGE_HANDLERS`` so a new stage plugs in
with ``register_stage`` and no edit here.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from uqcit.stages.allocate import AllocateConfig, allocate
from uqcit.stages.clusters import ClustersConfig, detect_clusters
from uqcit.stages.compensate import CompensateConfig, CompensateResult, compensate
from uqcit.stages.quantize import QuantizeConfig, QuantizeResult, quantize_model
from uqcit.core.config import StageConfig
from uqcit.stages.evaluate import EvalConfig, EvalResult, evaluate_many
from uqcit.stages.importance import ImportanceConfig, score_importance
from uqcit.stages.levels import LevelsConfig, analyze_levels
from uqcit.stages.plan import PlanConfig, build_plan
from uqcit.stages.prune import PruneConfig, PruneResult, prune_model
from uqcit.stages.retrain import RetrainConfig, RetrainResult, retrain
from uqcit.recipe import Recipe
from uqcit.stages.rotation import RotationConfig, rotate_model
from uqcit.core.results import Result, html_table
from uqcit.stages.sensitivity import SensitivityConfig, measure_sensitivity

Handler = Callable[["Session", Any], Result]
STAGE_HANDLERS: dict[type[StageConfig], Handler] = {}


def register_stage(config_type: type[StageConfig]) -> Callable[[Handler], Handler]:
    """Decorator: ``handler(session, config) -> Result`` runs stages of ``config_type``."""
    def deco(fn: Handler) -> Handler:
        STAGE_HANDLERS[config_type] = fn
        return fn
    return deco


@dataclasses.dataclass
class Session:
    """A model under compression: the float reference, its tokenizer and each stage's result.

    >>> s = Session.from_model("tiny-llama", progress=False)
    >>> s.run_stage(LevelsConfig()).n_blocks
    4
    """

    name: str
    reference: torch.nn.Module
    tokenizer: Any
    progress: bool = True
    results: dict[str, Result] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    state: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_model(cls, name: str, *, progress: bool = True) -> "Session":
        """Load a model by name (see ``uqcit.inputs.models.load_model``) into a new session."""
        from uqcit.inputs.models import load_model

        loaded = load_model(name, progress=progress)
        s = cls(name=name, reference=loaded.model, tokenizer=loaded.tokenizer, progress=progress)
        s.seconds["load"] = loaded.seconds
        return s

    def run_stage(self, config: StageConfig) -> Result:
        """Run one stage and keep its result under its type tag."""
        handler = STAGE_HANDLERS.get(type(config))
        if handler is None:
            known = sorted(c.type_tag for c in STAGE_HANDLERS)
            raise ValueError(f"no handler for stage type {config.type_tag!r}; known: {known}")
        t0 = time.perf_counter()
        result = handler(self, config)
        self.seconds[config.type_tag] = time.perf_counter() - t0
        self.results[config.type_tag] = result
        return result

    def run(self, recipe: Recipe, *, skip: tuple[str, ...] = ()) -> dict[str, Result]:
        """Run every stage of a recipe in order (except those whose type is in ``skip``)."""
        self.state["recipe"] = recipe
        for cfg in recipe.stages:
            if cfg.type_tag not in skip:
                self.run_stage(cfg)
        return self.results

    def require(self, tag: str) -> Result:
        if tag not in self.results:
            raise RuntimeError(f"stage {tag!r} has not run yet in this session; run it first")
        return self.results[tag]

    @property
    def compressed(self) -> torch.nn.Module | None:
        for tag in ("retrain", "compensate", "quantize", "prune"):  # a retrained model replaces what it retrained
            r = self.results.get(tag)
            if isinstance(r, (RetrainResult, CompensateResult, QuantizeResult, PruneResult)):
                return r.model
        return None


@register_stage(LevelsConfig)
def _levels(session: Session, cfg: LevelsConfig):
    return analyze_levels(session.reference, cfg)


@register_stage(PlanConfig)
def _plan(session: Session, cfg: PlanConfig):
    levels = session.require("levels")
    plan = build_plan(levels, cfg)
    session.state["plan"] = plan
    return plan.summarize(levels)


@register_stage(QuantizeConfig)
def _quantize(session: Session, cfg: QuantizeConfig):
    levels = session.require("levels")
    if "plan" not in session.state:
        raise RuntimeError("stage 'quantize' needs a bit plan; run a 'plan' stage first")
    rotation = session.results.get("rotation")
    return quantize_model(session.reference, levels, session.state["plan"], cfg,
                          tokenizer=session.tokenizer, clusters=session.state.get("clusters"),
                          rotation=rotation.config.method_name if rotation is not None else "",
                          progress=session.progress)


@register_stage(CompensateConfig)
def _compensate(session: Session, cfg: CompensateConfig):
    quantized = session.require("quantize")
    return compensate(quantized, session.reference, session.require("levels"), cfg,
                      tokenizer=session.tokenizer, progress=session.progress)


@register_stage(PruneConfig)
def _prune(session: Session, cfg: PruneConfig):
    levels = session.require("levels")
    return prune_model(session.reference, levels, cfg, tokenizer=session.tokenizer, progress=session.progress)


@register_stage(RetrainConfig)
def _retrain(session: Session, cfg: RetrainConfig):
    model = session.compressed
    if model is None:
        raise RuntimeError("stage 'retrain' needs a compressed model; run a 'quantize' or 'prune' stage first")
    return retrain(model, session.state.get("original", session.reference), session.tokenizer, cfg,
                   progress=session.progress)


@register_stage(ImportanceConfig)
def _importance(session: Session, cfg: ImportanceConfig):
    levels = session.require("levels")
    return score_importance(session.reference, levels, cfg, tokenizer=session.tokenizer,
                            sensitivity=session.results.get("sensitivity"), progress=session.progress)


@register_stage(SensitivityConfig)
def _sensitivity(session: Session, cfg: SensitivityConfig):
    levels = session.require("levels")
    return measure_sensitivity(session.reference, session.tokenizer, levels, cfg, progress=session.progress)


@register_stage(AllocateConfig)
def _allocate(session: Session, cfg: AllocateConfig):
    levels = session.require("levels")
    result = allocate(levels, session.require("sensitivity"), cfg)
    session.state["plan"] = result.plan  # a following "quantize" stage uses it
    return result


@register_stage(ClustersConfig)
def _clusters(session: Session, cfg: ClustersConfig):
    levels = session.require("levels")
    result = detect_clusters(session.reference, levels, cfg, session.tokenizer, progress=session.progress)
    session.state["clusters"] = result
    return result


@register_stage(RotationConfig)
def _rotation(session: Session, cfg: RotationConfig):
    from uqcit.inputs.corpus import calibration_batch

    original = session.state.setdefault("original", session.reference)  # always rotate the original
    ids = calibration_batch(session.tokenizer, n_samples=cfg.check_samples, seq_len=cfg.check_seq_len,
                            seed=cfg.seed)
    result = rotate_model(original, cfg, check_ids=ids, progress=session.progress)
    session.reference = result.model  # later stages (levels, sensitivity, quantize) see the rotated model
    if "levels" in session.results:  # names are unchanged, but an untied head changes tied_to
        session.results["levels"] = analyze_levels(session.reference, session.results["levels"].config)
    return result


@register_stage(EvalConfig)
def _eval(session: Session, cfg: EvalConfig):
    model = session.compressed
    if model is None:
        raise RuntimeError("stage 'eval' needs a compressed model; run a 'quantize' stage first")
    res = evaluate_many({"compressed": model}, session.tokenizer, cfg,
                        reference=session.state.get("original", session.reference),
                        progress=session.progress)
    session.state["eval_reference"] = res["reference"]
    return res["compressed"]


# --------------------------------------------------------------------------- the main job

@dataclasses.dataclass(repr=False)
class JobReport(Result):
    """The main job's outcome: measured quality, size and time of one compressed package."""

    model: str
    method: str
    package: str
    bpw: float
    package_bytes: int
    reference_bytes: int  # the float32 model's parameter bytes
    reference: EvalResult
    compressed: EvalResult
    seconds: dict[str, float]

    def summary(self) -> str:
        return (f"{self.model} → {self.method}: {self.bpw:.3f} bits/weight, "
                f"{self.package_bytes / 2**20:.1f} MiB package; {self.compressed.summary()}")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "method": self.method, "package": self.package,
                "bpw": self.bpw, "package_bytes": self.package_bytes,
                "reference_bytes": self.reference_bytes,
                "reference": self.reference.to_dict(), "compressed": self.compressed.to_dict(),
                "seconds": self.seconds}

    def rows(self) -> list[tuple[str, str]]:
        r, c = self.reference, self.compressed
        rows = [
            ("method", self.method),
            ("bits/weight (quantized layers, all stored bits)", f"{self.bpw:.3f}"),
            ("package bytes", f"{self.package_bytes:,} ({self.package_bytes / 2**20:.1f} MiB)"),
            ("float32 parameter bytes", f"{self.reference_bytes:,} ({self.reference_bytes / 2**20:.1f} MiB)"),
            ("perplexity reference → package", f"{r.ppl:.3f} → {c.ppl:.3f}"),
            ("KL(ref ‖ package), nats/token", f"{c.kl:.4f}"),
            ("top-1 agreement", f"{c.top1:.2f}%"),
            ("evaluation", "full protocol" if c.full_protocol else
             f"QUICK: {c.windows} window(s), not the full protocol"),
        ]
        rows += [(f"time: {k}", f"{v:.1f} s") for k, v in self.seconds.items()]
        return rows

    def format_table(self) -> str:
        rows = self.rows()
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)

    def _repr_html_(self) -> str:
        return f"<p><b>JobReport</b>: {self.summary()}</p>" + html_table(("", ""), self.rows())

    def figure(self):
        import plotly.graph_objects as go

        names = list(self.seconds)
        fig = go.Figure(go.Bar(x=names, y=[self.seconds[k] for k in names], uid="job-seconds"))
        fig.update_layout(title="Time per stage (s)", height=320)
        return fig


def _rotation_metadata(rotation) -> dict[str, Any]:
    """What the package records about the rotation it was quantized through (measured values)."""
    if rotation is None:
        return {}
    return {"rotation": {"construction": rotation.config.construction, "config": rotation.config.to_dict(),
                         "stored_bits": rotation.stored_bits, "max_logit_diff": rotation.max_logit_diff,
                         "invariants_passed": rotation.invariants.passed,
                         "online_overhead": rotation.online_overhead}}


def run_job(model_name: str, recipe: Recipe, out: str | os.PathLike, *,
            eval_config: EvalConfig | None = None, progress: bool = True,
            session: Session | None = None, signing_key=None, protect=None,
            secret=None) -> JobReport:
    """The main job: load, analyse, plan, quantize, export, load the package back, evaluate it.

    The evaluation runs on the model loaded from disk, and its numbers are written
    into the package's ``validation/`` files. ``signing_key``/``protect``/``secret`` go to
    ``export_package`` (see ``uqcit.package.secure``); a signed package is verified when loaded
    back and re-signed after its validation files are written.
    """
    from uqcit.package import export as pkg

    session = session or Session.from_model(model_name, progress=progress)
    session.run(recipe, skip=("eval",))
    quantized = (session.results.get("compensate") or session.results.get("quantize")
                 or session.results.get("prune"))  # what the package stores
    if quantized is not None and "retrain" in session.results:
        quantized = session.results["retrain"].apply_to(quantized)
    if quantized is None:
        raise RuntimeError(f"recipe {recipe.name!r} has no 'quantize' or 'prune' stage: nothing to export")
    out = Path(out)

    t0 = time.perf_counter()
    pkg.export_package(quantized, session.tokenizer, out, recipe=recipe, source_model=model_name,
                       levels=session.results.get("levels"), clusters=session.results.get("clusters"),
                       sensitivity=session.results.get("sensitivity"),
                       extra_metadata=_rotation_metadata(session.results.get("rotation")),
                       signing_key=signing_key, protect=protect, secret=secret)
    session.seconds["export"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    loaded = pkg.load_package(out, progress=progress, secret=secret,
                              public_key=signing_key.public_key() if signing_key is not None else None)
    session.seconds["load_package"] = time.perf_counter() - t0

    cfg = eval_config or recipe.stage("eval") or EvalConfig()
    t0 = time.perf_counter()
    original = session.state.get("original", session.reference)  # the unrotated float model
    res = evaluate_many({"package": loaded.model}, session.tokenizer, cfg,
                        reference=original, progress=progress)
    session.seconds["evaluate"] = time.perf_counter() - t0

    ref, comp = res["reference"], res["package"]
    protocol = cfg.to_dict()
    pkg.write_validation(out, "perplexity", {
        "protocol": protocol, "full_protocol": comp.full_protocol, "windows": comp.windows,
        "tokens": comp.tokens, "reference_ppl": ref.ppl, "package_ppl": comp.ppl}, signing_key=signing_key)
    pkg.write_validation(out, "benchmarks", {
        "protocol": protocol, "kl": comp.kl, "top1": comp.top1, "reference": ref.to_dict(),
        "package": comp.to_dict()}, signing_key=signing_key)
    ref_bytes = sum(p.numel() * p.element_size() for p in original.parameters())
    return JobReport(model=model_name, method=quantized.method_name, package=str(out), bpw=quantized.bpw,
                     package_bytes=pkg.package_bytes(out), reference_bytes=ref_bytes, reference=ref,
                     compressed=comp, seconds={k: round(v, 2) for k, v in session.seconds.items()})

"""Run recipes: a session that holds a model under compression, and the main job.

A ``Session`` holds the original model and every stage's result; running a stage
config looks its handler up in the one registry (``uqcit.core.config.handler_for``:
each handler sits beside its config in its stage module), so a new stage plugs in
with no edit here. ``run_job`` is the CLI's job; ``export_session`` its export step,
which the widgets use too.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from uqcit import package as pkg
from uqcit.core.config import StageConfig, handler_for
from uqcit.core.results import Result, html_table
from uqcit.recipe import Recipe
from uqcit.stages.evaluate import EvalConfig, EvalResult, evaluate_many
from uqcit.stages.levels import LevelsConfig
from uqcit.stages.plan import BitPlan

# Stages whose result holds the compressed model, by precedence: a compensated model wraps the
# quantized one; a retrain, when there is one, retrains whichever of them comes first.
COMPRESSING_STAGES = ("compensate", "quantize", "prune")


def compressed_result(results: Mapping[str, Result], *, stored: bool = False) -> Result | None:
    """The one answer to "which model is the compressed one": the result of the first of
    ``COMPRESSING_STAGES`` that ran, with a retrain applied on top; None when none ran.

    ``stored=False`` gives the ``RetrainResult`` itself, its model as trained (what evaluation and
    a second retrain use); ``stored=True`` the form a package stores (``RetrainResult.apply_to``:
    LoRA adapters folded into compensations and counted in the bits).
    """
    base = next((results[tag] for tag in COMPRESSING_STAGES if tag in results), None)
    retrained = results.get("retrain")
    if base is None or retrained is None:
        return base
    return retrained.apply_to(base) if stored else retrained


@dataclasses.dataclass
class Session:
    """A model under compression: the original float model, its tokenizer and each stage's result.

    ``reference`` is always the original model (evaluation and retraining compare against it);
    ``working`` is the model later stages analyse and compress: the rotated one after a
    rotation stage, else the original.

    >>> s = Session.from_model("tiny-llama", progress=False)
    >>> s.run_stage(LevelsConfig()).n_blocks
    4
    """

    name: str
    reference: torch.nn.Module  # the original float model; never replaced
    tokenizer: Any
    progress: bool = True
    results: dict[str, Result] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    plan: BitPlan | None = None  # the bit plan of the last plan/allocate stage; quantize uses it
    rotated: torch.nn.Module | None = None  # set by a rotation stage (a rotated copy of reference)

    @classmethod
    def from_model(cls, name: str, *, progress: bool = True) -> "Session":
        """Load a model by name (see ``uqcit.inputs.models.load_model``) into a new session."""
        from uqcit.inputs.models import load_model

        loaded = load_model(name, progress=progress)
        s = cls(name=name, reference=loaded.model, tokenizer=loaded.tokenizer, progress=progress)
        s.seconds["load"] = loaded.seconds
        return s

    @property
    def working(self) -> torch.nn.Module:
        """The model later stages analyse and compress: rotated after a rotation, else the original."""
        return self.rotated if self.rotated is not None else self.reference

    @property
    def compressed(self) -> torch.nn.Module | None:
        """The compressed model (see ``compressed_result``), or None before any compressing stage."""
        result = compressed_result(self.results)
        return None if result is None else result.model

    def run_stage(self, config: StageConfig) -> Result:
        """Run one stage and keep its result under its type tag."""
        handler = handler_for(type(config))
        t0 = time.perf_counter()
        result = handler(self, config)
        self.seconds[config.type_tag] = time.perf_counter() - t0
        self.results[config.type_tag] = result
        return result

    def run(self, recipe: Recipe, *, skip: tuple[str, ...] = ()) -> dict[str, Result]:
        """Run every stage of a recipe in order (except those whose type is in ``skip``)."""
        for cfg in recipe.stages:
            if cfg.type_tag not in skip:
                self.run_stage(cfg)
        return self.results

    def require(self, tag: str) -> Result:
        if tag not in self.results:
            raise RuntimeError(f"stage {tag!r} has not run yet in this session; run it first")
        return self.results[tag]


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


def export_session(session: Session, out: str | os.PathLike, *, recipe: Recipe | None, model_name: str,
                   signing_key=None, protect=None, secret=None) -> Result:
    """Write what a session holds as a package at ``out``: its compressed model (``compressed_result``,
    stored form) with the levels, clusters, sensitivity and rotation it went through, and ``recipe``.

    The export step of ``run_job`` and of the widgets: one way to write a package. Returns the
    result the package stores. ``signing_key``/``protect``/``secret``: see ``run_job``.
    """
    quantized, options = _export_options(session, recipe, model_name)
    t0 = time.perf_counter()
    pkg.export_package(quantized, session.tokenizer, Path(out), signing_key=signing_key, protect=protect,
                       secret=secret, **options)
    session.seconds["export"] = time.perf_counter() - t0
    return quantized


def _export_options(session: Session, recipe: Recipe | None, model_name: str) -> tuple[Result, dict[str, Any]]:
    """What ``export_package`` stores of a session: its compressed result and the export keywords."""
    quantized = compressed_result(session.results, stored=True)  # what the package stores
    if quantized is None:
        what = f"recipe {recipe.name!r}" if recipe is not None else f"session {session.name!r}"
        raise RuntimeError(f"{what} has no 'quantize' or 'prune' stage: nothing to export")
    return quantized, dict(recipe=recipe, source_model=model_name, levels=session.results.get("levels"),
                           clusters=session.results.get("clusters"),
                           sensitivity=session.results.get("sensitivity"),
                           extra_metadata=_rotation_metadata(session.results.get("rotation")))


# --------------------------------------------------------------------------- preflight

_BOUND_NUMEL = 1 << 20  # weights of the tensor the budget bounds are computed at (group overhead amortized)


def preflight(recipe: Recipe, out: str | os.PathLike, *, model_name: str | None = None,
              tokenizer=None, eval_config: EvalConfig | None = None) -> None:
    """Check a job's inputs before any work: raise on the first one that would fail it later.

    ``model_name`` (when given): a name ``load_model`` can load (``check_model_name``: no download,
    no retry). ``recipe``: it has a compressing stage, and an ``allocate`` budget within what its
    candidates can store. ``out``: a new path, an empty folder or a UQCIT package (which the export
    replaces); never a file or a folder of other files. ``tokenizer`` (when given): the evaluation
    text of ``eval_config`` (else the recipe's, else the default) holds the windows it asks for.
    Raises ``ConfigError`` (recipe, evaluation text), ``FileExistsError``/``NotADirectoryError``/
    ``PermissionError`` (``out``) or ``ModelNotFoundError``; each message names what to change.

    >>> import tempfile
    >>> from uqcit.recipe import builtin_recipe
    >>> preflight(builtin_recipe("rtn-w4-g128"), Path(tempfile.mkdtemp()) / "pkg", model_name="tiny-llama")
    >>> preflight(builtin_recipe("rtn-w4-g128"), "/etc/passwd")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileExistsError: --out '/etc/passwd' is a file, not a package folder; ...
    """
    if model_name is not None:
        from uqcit.inputs.models import check_model_name

        check_model_name(model_name)
    _check_recipe(recipe)
    _check_target(Path(out))
    if tokenizer is not None:
        _check_eval_text(tokenizer, eval_config or recipe.stage("eval") or EvalConfig())


def _check_recipe(recipe: Recipe) -> None:
    from uqcit.core.keys import ConfigError
    from uqcit.stages.allocate import FLOAT
    from uqcit.stages.sensitivity import resolve_formats
    from uqcit.tensor.formats import FLOAT_BITS, parse_format

    tags = [s.type_tag for s in recipe.stages]
    if not any(tag in tags for tag in COMPRESSING_STAGES):
        raise ConfigError(f"recipe {recipe.name!r} has no {' / '.join(COMPRESSING_STAGES)} stage, so "
                          "there is nothing to export; add one (see `uqcit recipes uqcit-default`)")
    alloc, sens = recipe.stage("allocate"), recipe.stage("sensitivity")
    if alloc is None:
        return
    where = f"recipe {recipe.name!r}: AllocateConfig"
    if alloc.target_bpw > FLOAT_BITS:
        raise ConfigError(f"{where}.target_bpw {alloc.target_bpw:g} is above {FLOAT_BITS} bits/weight "
                          "(fp16, the most a weight is stored with); give a budget in (0, 16]")
    if sens is None:
        raise ConfigError(f"{where} needs a 'sensitivity' stage before it (the measured candidates); "
                          "add one (see `uqcit recipes alloc-gptq-3.25`)")
    measured = {f.name: f for f in resolve_formats(sens.formats, sens.group_size)}
    unknown = sorted(set(alloc.formats or ()) - set(measured))
    if unknown:
        raise ConfigError(f"{where}.formats {unknown} are not measured by the sensitivity stage "
                          f"(measured: {sorted(measured)}); name measured formats")
    allowed = [measured[f] for f in (alloc.formats or measured)]
    pinned = [None if v == FLOAT else parse_format(v) for v in alloc.pins.values()]
    bpw = [f.bits_per_weight(_BOUND_NUMEL) for f in allowed]
    top = max(bpw + [FLOAT_BITS if f is None else f.bits_per_weight(_BOUND_NUMEL) for f in pinned])
    if alloc.target_bpw > top:
        raise ConfigError(f"{where}.target_bpw {alloc.target_bpw:g} is above {top:.3f} bits/weight, the "
                          "most its candidate formats store; lower it or add a wider format")
    if not alloc.pins and alloc.target_bpw < min(bpw):
        raise ConfigError(f"{where}.target_bpw {alloc.target_bpw:g} is below {min(bpw):.3f} bits/weight, "
                          "what its cheapest candidate format stores; raise it or add a narrower format")


def _check_target(out: Path) -> None:
    from uqcit.package import METADATA_FILE

    if out.is_symlink() and not out.exists():
        raise FileExistsError(f"--out {str(out)!r} is a dangling symbolic link; remove it or choose another path")
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"--out {str(out)!r} is a file, not a package folder; choose another "
                                  "path (an existing file is never replaced)")
        if not (out / METADATA_FILE).is_file() and any(out.iterdir()):
            raise FileExistsError(f"--out {str(out)!r} is a folder of other files, not a UQCIT package "
                                  f"(no {METADATA_FILE}); choose a new or empty folder (a folder the "
                                  "workbench did not write is never replaced)")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {str(out)!r}: folder {str(parent)!r} is not writable")


def _check_eval_text(tokenizer, cfg: EvalConfig) -> None:
    """Tokenize the evaluation text now (the encoding is cached for the evaluation itself)."""
    from uqcit.core.keys import ConfigError
    from uqcit.inputs import corpus as data

    try:
        text = data.text_for(cfg.corpus)
        data.eval_windows(tokenizer, text, total_tokens=cfg.total_tokens, window=cfg.window,
                          max_windows=cfg.max_windows)
    except (ValueError, FileNotFoundError) as exc:  # missing, empty, undecodable or too short
        raise ConfigError(f"EvalConfig.corpus {cfg.corpus!r}: {exc}") from exc


def run_job(model_name: str, recipe: Recipe, out: str | os.PathLike, *,
            eval_config: EvalConfig | None = None, progress: bool = True,
            session: Session | None = None, signing_key=None, protect=None,
            secret=None) -> JobReport:
    """The main job: load, analyse, plan, quantize, export, load the package back, evaluate it.

    The evaluation runs on the model loaded from disk, and its numbers are written
    into the package's ``validation/`` files before the package is sealed and swapped in at
    ``out`` (``stage_package``): a failed or killed run leaves ``out`` as it was.
    ``signing_key``/``protect``/``secret`` go to ``export_package`` (see ``uqcit.package.secure``);
    the signature covers the validation files.
    """
    preflight(recipe, out, model_name=None if session else model_name)  # before anything is loaded
    session = session or Session.from_model(model_name, progress=progress)
    preflight(recipe, out, tokenizer=session.tokenizer, eval_config=eval_config)  # the evaluation text
    session.run(recipe, skip=("eval",))
    out = Path(out)
    quantized, options = _export_options(session, recipe, model_name)
    cfg = eval_config or recipe.stage("eval") or EvalConfig()
    t0 = time.perf_counter()
    # Staged: the package is loaded back and evaluated from its temporary folder, its figures
    # written there, and only then sealed (manifest, signature) and swapped in, in one step.
    with pkg.stage_package(quantized, session.tokenizer, out, signing_key=signing_key, protect=protect,
                           secret=secret, **options) as staged:
        session.seconds["export"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        loaded = pkg.load_package(staged.path, progress=progress, secret=secret, verify=False)  # just written
        session.seconds["load_package"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        res = evaluate_many({"package": loaded.model}, session.tokenizer, cfg,
                            reference=session.reference, progress=progress)  # the original, unrotated model
        session.seconds["evaluate"] = time.perf_counter() - t0

        ref, comp = res["reference"], res["package"]
        protocol = cfg.to_dict()
        staged.write_validation("perplexity", {
            "protocol": protocol, "full_protocol": comp.full_protocol, "windows": comp.windows,
            "tokens": comp.tokens, "reference_ppl": ref.ppl, "package_ppl": comp.ppl})
        staged.write_validation("benchmarks", {
            "protocol": protocol, "kl": comp.kl, "top1": comp.top1, "reference": ref.to_dict(),
            "package": comp.to_dict()})
        staged.commit()  # manifest and signature cover the figures; verified, then swapped in
    ref_bytes = sum(p.numel() * p.element_size() for p in session.reference.parameters())
    return JobReport(model=model_name, method=quantized.method_name, package=str(out), bpw=quantized.bpw,
                     package_bytes=pkg.package_bytes(out), reference_bytes=ref_bytes, reference=ref,
                     compressed=comp, seconds={k: round(v, 2) for k, v in session.seconds.items()})

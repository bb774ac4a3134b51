"""The quantize job, one decoder block at a time: for models larger than memory.

``compress_streamed(folder, recipe, out)`` runs a recipe's ``levels``, ``plan`` and ``quantize``
(``rtn``, ``gptq`` one-shot or sequential, or ``signround``) on a local safetensors model folder
without loading it: the levels and the plan come from the meta-device skeleton (shapes and names
only); the calibration text runs through the embedding once and then, block by block, through
each block whose float weights are read from the shards just for it (``LazyCheckpoint``),
quantized, written as its package layer folder and freed. The embedding, the final norm and
the head are read at the end. Peak memory: one block in float, the calibration activations
(``samples x seq_len x hidden`` floats, twice for signround, and for sequential GPTQ with an
untied head or activation importance), the tokenizer and the modules outside the blocks at the end.

``signround`` carries the float model's and the quantized model's block inputs and runs the
in-memory loop's step (``uqcit.stages.signround.signround_block``) on each block, its random
generator carried on from block to block (and through a resume).

With ``head_feedback`` (``gptq`` or ``signround``), an embedding tied to the head is rounded at the
end by GPTQ against the head's inputs: the stream of block inputs through the final norm, the
pass ``quantize_model`` makes for it (``feedback_heads``).

The package is the one the in-memory path writes for the same recipe, file for file
(``tests/stream/test_job.py``): the same statistics reach the same rounding code, in the same
order. What the in-memory job adds and this one does not: the evaluation (it needs the whole
float model), signing and encryption.

``device="cuda"`` (or ``"cuda:N"``) computes on a GPU: the calibration activations live there,
each block is moved there for its statistics and GPTQ and back to the CPU before it is written
(the modules outside the blocks likewise, at the end); peak GPU memory is one block in float and
the activations. The default, the CPU, moves nothing. ``device_map`` (``uqcit.stream.devices``:
``"balanced"`` over the visible GPUs, or block -> device) computes each block on its own device:
the activations move to a block's device when it differs from the previous block's, so they are
on one device at a time; the modules outside the blocks compute on block 0's device, the head's
inputs moved there one micro-batch at a time.

Each finished block is a checkpoint in the run folder (``uqcit.stream.checkpoint``): a job
interrupted after block k resumes at block k + 1 when it is started again with the same
arguments.

>>> import tempfile
>>> from pathlib import Path
>>> from uqcit.inputs.tiny import tiny_model
>>> from uqcit.recipe import builtin_recipe
>>> model, tok = tiny_model("llama")
>>> src = Path(tempfile.mkdtemp())
>>> model.save_pretrained(src); tok.save_pretrained(src)  # doctest: +ELLIPSIS
(...)
>>> report = compress_streamed(src, builtin_recipe("rtn-w4-g128"), src.parent / "pkg", progress=False)
>>> report.method, report.blocks
('rtn-w4-g128', 4)
"""
from __future__ import annotations

import copy
import os
import resource
import time
from pathlib import Path
from typing import Any, Callable

import torch

from uqcit.core.keys import ConfigError
from uqcit.core.names import layer_dir
from uqcit.core.record import module_records
from uqcit.inputs.calibration import InputStatsCollector, channel_importance
from uqcit.inputs.replay import block_output
from uqcit.inputs.corpus import stage_calibration
from uqcit.package.canonical import created_stamp
from uqcit.package.export import layer_parts, link_or_copy, stage_with, write_config, write_layer, write_rest
from uqcit.package.format import package_bytes
from uqcit.recipe import Recipe
from uqcit.runtime.modules import QuantLinear, block_stack, replace_module, weight_matrix
from uqcit.stages.importance import activation_source
from uqcit.stages.levels import LevelsConfig, analyze_levels
from uqcit.stages.plan import build_plan
from uqcit.stages.quantize import (
    ModuleQuant, QuantizeConfig, QuantizeResult, feedback_heads, round_weight, runtime_module,
)
from uqcit.stages.signround import learnable_blocks, signround_block
from uqcit.stream.checkpoint import RunState, open_run
from uqcit.stream.devices import DeviceMap, check_device_map, format_device_map, place_blocks
from uqcit.stream.report import StreamReport
from uqcit.stream.source import LazyCheckpoint, free
from uqcit.tensor.formats import FLOAT_BITS
from uqcit.tensor.quant import QuantizedTensor, quant_error

MICRO_BATCH = 4  # calibration sequences per forward: collect_input_stats' default, so sums add up alike
STREAMABLE = ("levels", "plan", "quantize", "eval")  # "eval" is skipped: it needs the whole float model
STREAMED_METHODS = ("rtn", "gptq", "signround")  # QuantizeConfig.method
RNG = "rng"  # the checkpoint's entry for signround's random generator state


def compress_streamed(source: str | os.PathLike, recipe: Recipe, out: str | os.PathLike, *,
                      run_dir: str | os.PathLike | None = None, model_name: str | None = None,
                      progress: bool = True, on_block: Callable[[int], None] | None = None,
                      device: str | torch.device | None = None, device_map: DeviceMap = None) -> StreamReport:
    """Write ``recipe``'s package of the model folder ``source`` at ``out``, one block at a time.

    ``run_dir`` (default: ``.<out name>.stream`` beside ``out``) holds the block checkpoints; it
    is removed when the package is in place. ``model_name`` is the name the package records as
    its source (default: ``source`` as given). ``on_block(i)`` is called after block ``i`` is
    checkpointed (a progress hook; an exception it raises stops the job, resumably). ``device``
    (``"cpu"``, the default, ``"cuda"``, ``"cuda:N"``) is where the statistics and GPTQ run; or
    ``device_map`` places each block (``uqcit.stream.devices``; not with ``device``). A resumed job
    may use another device or map: run.json records where each block ran. Raises ``ConfigError``
    for a recipe stage that cannot stream, a device this machine does not have, or a map that
    does not place each block exactly once.
    """
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from uqcit.pipeline import preflight

    t_start = time.perf_counter()
    spec = check_device_map(device, device_map)  # before any work: a GPU that is not there fails now
    levels_cfg, plan_cfg, qcfg = _stages(recipe)
    preflight(recipe, out)
    out = Path(out)
    ckpt = LazyCheckpoint(source)
    tokenizer = AutoTokenizer.from_pretrained(ckpt.folder, local_files_only=True)
    skeleton = ckpt.skeleton()
    levels = analyze_levels(skeleton, levels_cfg)
    plan = build_plan(levels, plan_cfg)
    job = _Job(skeleton, levels, plan, qcfg, spec)  # checks the map covers the blocks
    run = open_run(Path(run_dir) if run_dir is not None else out.parent / f".{out.name}.stream",
                   {"source": str(ckpt.folder), "recipe": recipe.to_dict(), "shards": ckpt.fingerprint()})
    start = run.state.next_block
    block_seconds: list[float] = []
    seconds = {"calibration": 0.0}
    if job.needs_calibration:
        t0 = time.perf_counter()
        batch = stage_calibration(qcfg, tokenizer, None, what=f"quantize with method={qcfg.method!r}")
        # recomputed on resume
        calls, job.stats = _block_calls(skeleton, ckpt, job.stack, batch, job.outside, job.micro_batch)
        job.kwargs = [kwargs for _, kwargs in calls]  # on the CPU: each block moves them to its device
        streams = run.load_streams()
        if streams is None:  # a fresh run: the streams start as the embeddings
            first = [h for h, _ in calls]
            streams = {"q": first, "f": [h.clone() for h in first]} if job.float_stream else {"q": first}
        elif RNG in streams:  # signround's micro-batch draws go on where the checkpoint left them
            job.gen.set_state(streams.pop(RNG)[0])
        job.streams = streams
        del calls
        seconds["calibration"] += time.perf_counter() - t0
    for b in tqdm(range(start, job.n_blocks), desc="blocks", unit="block", disable=not progress):
        t0 = time.perf_counter()
        work = copy.deepcopy(job.stack[b])  # meta: the skeleton keeps no weights
        ckpt.load_into(work, f"{job.stack_name}.{b}.")
        records, parts = job.block(b, work)
        layer = layer_dir(b)
        write_layer(run.root, layer, parts.tensors.get(layer, {}), parts.precision.get(layer, {}), {}, None)
        free(work)
        del work
        run.state.add_block(records, parts.modules, parts.float_tensors, b, str(job.devices[b]))
        run.save(b + 1, job.checkpoint())
        block_seconds.append(time.perf_counter() - t0)
        if on_block is not None:
            on_block(b)

    t0 = time.perf_counter()
    records, parts = job.outer(ckpt, run.state)
    result = QuantizeResult(skeleton, records, plan, 0.0, method=qcfg.method, sequential=job.sequential)
    record = result.export_record()
    seconds["outer"] = time.perf_counter() - t0

    def write(tmp: Path) -> None:
        write_config(tmp, skeleton.config)
        for folder in sorted(run.root.joinpath("layers").iterdir()):
            (tmp / "layers" / folder.name).mkdir(parents=True)
            for f in sorted(folder.iterdir()):
                link_or_copy(str(f), str(tmp / "layers" / folder.name / f.name))
        write_layer(tmp, layer_dir(None), parts.tensors.get(layer_dir(None), {}),
                    parts.precision.get(layer_dir(None), {}), {}, None)
        write_rest(record, tokenizer, tmp, recipe=recipe, source_model=model_name or str(source), validation={},
                   extra={}, created=created_stamp(True), modules={**run.state.modules, **parts.modules},
                   float_tensors={**run.state.float_tensors, **parts.float_tensors}, online_rotations={})

    t0 = time.perf_counter()
    with stage_with(out, write) as staged:
        staged.commit()
    seconds["export"] = time.perf_counter() - t0
    run.remove()
    seconds["total"] = time.perf_counter() - t_start
    float_bytes = 4 * sum(p.numel() for p in skeleton.parameters())
    return StreamReport(model=model_name or str(source), method=record.method, package=str(out), bpw=record.bpw,
                        package_bytes=package_bytes(out), float_bytes=float_bytes, blocks=job.n_blocks,
                        resumed_at=start, block_seconds=[round(s, 3) for s in block_seconds],
                        seconds={k: round(v, 2) for k, v in seconds.items()},
                        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                        device=format_device_map(run.state.devices))


def _stages(recipe: Recipe) -> tuple[LevelsConfig, Any, QuantizeConfig]:
    """The recipe's levels, plan and quantize configs; a stage that cannot stream is refused."""
    others = [s.type_tag for s in recipe.stages if s.type_tag not in STREAMABLE]
    if others:
        raise ConfigError(f"recipe {recipe.name!r}: stage(s) {others} cannot run streamed (block by block) yet; "
                          f"streaming runs {' / '.join(STREAMABLE[:3])}: drop them or run without --stream")
    plan_cfg, qcfg = recipe.stage("plan"), recipe.stage("quantize")
    if plan_cfg is None or qcfg is None:
        raise ConfigError(f"recipe {recipe.name!r}: a streamed job needs a 'plan' and a 'quantize' stage")
    if qcfg.method not in STREAMED_METHODS:
        raise ConfigError(f"recipe {recipe.name!r}: QuantizeConfig.method {qcfg.method!r} cannot run streamed "
                          f"yet; use {' / '.join(map(repr, STREAMED_METHODS))}, or run without --stream")
    if qcfg.asymmetric:  # its paired float/quantized statistics are collected in memory only (BlockReplay)
        raise ConfigError(f"recipe {recipe.name!r}: QuantizeConfig.asymmetric=True cannot run streamed yet; "
                          "set asymmetric=False, or run without --stream")
    return recipe.stage("levels") or LevelsConfig(), plan_cfg, qcfg


def _block_calls(skeleton, ckpt: LazyCheckpoint, stack, batch: torch.Tensor, want: dict[str, bool],
                 micro_batch: int = MICRO_BATCH):
    """Per calibration micro-batch of ``micro_batch`` sequences: the first block's input and the
    keyword arguments every block gets (mask, positions, rotary embeddings); and the statistics of
    ``want``'s modules that run before the blocks (an embedding's token counts). Only the modules
    before the blocks hold weights meanwhile: the outer ones minus the head, read and freed here."""
    head = skeleton.get_output_embeddings()
    before = _outer_modules(skeleton, stack) - ({id(head)} if head is not None else set())
    loaded = [m for m in skeleton.modules() if id(m) in before and not list(m.children())]
    for m in loaded:
        ckpt.load_into(m, _prefix_of(skeleton, m))
    calls: list[tuple[torch.Tensor, dict]] = []

    def catch(module, args, kwargs):
        calls.append((args[0].detach(), dict(kwargs)))
        raise _Caught

    names = {n for n, m in skeleton.named_modules() if id(m) in before}
    handle = stack[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with InputStatsCollector(skeleton, {n: h for n, h in want.items() if n in names}) as col, torch.no_grad():
            for s in range(0, batch.shape[0], micro_batch):
                try:
                    skeleton(input_ids=batch[s:s + micro_batch], use_cache=False)
                except _Caught:
                    pass
                col.end_batch()
    finally:
        handle.remove()
        for m in loaded:
            free(m)
    return calls, col.stats()


class _Caught(Exception):
    """Raised at the first block: the rest of the forward pass is not needed (nor loaded)."""


def _outer_modules(skeleton, stack) -> set[int]:
    inside = {id(m) for m in stack.modules()}
    return {id(m) for m in skeleton.modules() if id(m) not in inside and m is not skeleton}


def _prefix_of(model, module) -> str:
    name = next(n for n, m in model.named_modules() if m is module)
    return f"{name}." if name else ""


class _Job:
    """The per-block work of one streamed quantize job (what ``quantize_model`` does, per block)."""

    def __init__(self, skeleton, levels, plan, config: QuantizeConfig, spec):
        self.skeleton, self.levels, self.plan, self.config = skeleton, levels, plan, config
        self.entries = [m for m in levels.modules if m.tied_to is None and plan.format_for(m.name) is not None]
        pattern = levels.ruleset.block_pattern
        found = block_stack(skeleton, [m.name for m in levels.modules], pattern)
        if found is None:
            raise ConfigError(f"{type(skeleton).__name__}: no single stack of blocks to stream; run it in memory")
        self.stack_name, self.stack = found
        self.n_blocks = len(self.stack)
        self.devices = place_blocks(spec, self.n_blocks, self.stack_name)  # check_device_map's spec, per block
        self.device = self.devices[0]  # the modules outside the blocks
        self.at = torch.device("cpu")  # where the streams and the blocks' arguments are now
        kinds = set(getattr(skeleton.config, "layer_types", None) or ())
        if len(kinds) > 1:  # the blocks' arguments are recorded once, at the first block
            raise ConfigError(f"{type(skeleton).__name__}: blocks of several attention types {sorted(kinds)} "
                              "cannot stream yet; run it in memory")
        self.gptq = {e.name for e in self.entries if config.method == "gptq" and e.kind != "embedding"
                     and plan.format_for(e.name).bits != FLOAT_BITS}
        self.act = {e.name: activation_source(levels, e.name) for e in self.entries
                    if config.importance == "activation" and plan.format_for(e.name).mixed}
        self.sequential = config.sequential and bool(self.gptq & set(self._inside()))
        outside = ((self.gptq | set(self.act.values())) - set(self._inside()))
        # Statistics of the modules outside the blocks, from the float model (as quantize_model's
        # one pass): name -> with a Hessian. One-shot collects every one with Hessians if any GPTQ.
        self.outside = {n: (n in self.gptq if self.sequential else bool(self.gptq)) for n in sorted(outside)}
        # signround: per block, the modules whose rounding is learned (by name) and their formats
        found = learnable_blocks(skeleton, levels, plan) if config.method == "signround" else None
        self.learned = found[1] if found is not None else {}
        if self.learned and self.act and config.micro_batch != MICRO_BATCH:
            raise ConfigError(f"method 'signround' with importance='activation' streams only with "
                              f"micro_batch={MICRO_BATCH}: set it, or run without --stream")
        self.micro_batch = config.micro_batch if self.learned else MICRO_BATCH
        self.gen = torch.Generator().manual_seed(config.seed)  # signround_blocks' one generator
        # Tied embeddings rounded against the head's inputs, read at the end off the stream "q"; a
        # model without a final norm to run it through is refused now rather than after the blocks.
        self.head_of = feedback_heads(levels, plan, config)
        if self.head_of:
            self._final(sorted(set(self.head_of.values())))
        self.needs_calibration = bool(self.gptq or self.act or self.learned or self.head_of)
        self.float_stream = bool(self.learned) or (self.sequential and bool(set(self.act.values()) | outside))
        self.kwargs: list[dict] = []  # per micro-batch: what every block gets besides its input (mask, rotary)
        self.streams: dict[str, list[torch.Tensor]] = {}
        self.stats: dict[str, Any] = {}  # statistics of modules quantized later (the head)

    def _inside(self) -> list[str]:
        return [e.name for e in self.entries if e.name.startswith(self.stack_name + ".")]

    def checkpoint(self) -> dict[str, list[torch.Tensor]]:
        """What a resumed job needs besides the finished blocks: the streams on the CPU and, for
        signround, the random generator's state."""
        out = {k: [h.cpu() for h in hs] for k, hs in self.streams.items()}
        return {**out, RNG: [self.gen.get_state()]} if self.learned else out

    def block(self, b: int, work: torch.nn.Module):
        """Calibrate, quantize and advance block ``b`` (``work``, its float weights loaded on the CPU;
        computed on block ``b``'s device, the activations moved there, and back on the CPU when this returns)."""
        self._move_streams(self.devices[b])
        work.to(self.devices[b])
        prefix = f"{self.stack_name}.{b}."
        names = [e for e in self.entries if e.name.startswith(prefix)]
        rel = {e.name: e.name[len(prefix):] for e in names}
        stats: dict[str, Any] = {}  # importance statistics (one-shot: the Hessians' too)
        hess: dict[str, Any] = stats
        learned: dict[str, QuantizedTensor] = {}
        if self.learned:  # as signround_blocks; importance statistics one-shot, on the float stream
            want = {rel[n]: False for n in self.act.values() if n in rel}
            stats = self._run(work, "f", want, prefix, advance=False) if want else stats
            cfg, formats = self.config, {rel[n]: fmt for n, fmt in self.learned.get(b, {}).items()}
            learned, _ = signround_block(work, formats, [((), kw) for kw in self.kwargs], self.streams["f"],
                                         self.streams["q"], self.gen, iters=cfg.iters, lr=cfg.lr,
                                         clip_min=cfg.clip_min, index=b, prefix=prefix)
        elif self.needs_calibration:
            if self.sequential:  # as BlockReplay: Hessians on the quantized stream, the rest one-shot
                if self.float_stream:
                    stats = self._run(work, "f", {rel[n]: False for n in self.act.values() if n in rel}, prefix)
                hess = self._run(work, "q", {rel[n]: True for n in self.gptq if n in rel}, prefix, advance=False)
            else:
                wanted = sorted(rel[n] for n in (self.gptq | set(self.act.values())) if n in rel)
                stats.update(self._run(work, "q", {n: bool(self.gptq) for n in wanted}, prefix))
        records = [self._quantize(work, e, rel[e.name], stats, hess, learned.get(e.name)) for e in names]
        if self.sequential:  # the quantized block's outputs feed the next block's Hessians
            self._run(work, "q", {}, prefix)
        work.to("cpu")  # the package is written from the CPU
        modules = {prefix + n: m for n, m in work.named_modules() if n}
        state = {prefix + k: v for k, v in work.state_dict().items()}
        by_name = {r.name: r for r in module_records(records)}
        return records, layer_parts(modules, state, by_name)

    def _move_streams(self, device: torch.device) -> None:
        """The streams and the blocks' arguments to ``device`` when they are elsewhere, micro-batch by
        micro-batch: each is freed where it was once its copy is made, so no device holds two copies."""
        from accelerate.utils import send_to_device  # the masks and rotary tensors nested in the kwargs

        if device != self.at:
            for hs in self.streams.values():
                for i in range(len(hs)):
                    hs[i] = hs[i].to(device)
            self.kwargs = [send_to_device(kw, device) for kw in self.kwargs]
            self.at = device

    def _run(self, work, stream: str, want: dict[str, bool], prefix: str, *, advance: bool = True):
        """Run ``work`` on a stream's micro-batches collecting ``want``'s statistics; with
        ``advance`` its outputs replace the stream."""
        hidden = self.streams[stream]
        with InputStatsCollector(work, want) as col, torch.no_grad():
            for mb, kwargs in enumerate(self.kwargs):
                out = block_output(work(hidden[mb], **kwargs))
                if advance:
                    hidden[mb] = out.detach()
                col.end_batch()
        return {prefix + n: s for n, s in col.stats().items()}

    def _quantize(self, root: torch.nn.Module, entry, rel: str, stats, hess,
                  learned: QuantizedTensor | None = None) -> ModuleQuant:
        """One module, as ``quantize_model``'s ``quantize_one`` rounds it (or stores ``learned``,
        its learned rounding); replaced in ``root``."""
        t0 = time.perf_counter()
        cfg, fmt = self.config, self.plan.format_for(entry.name)
        module = root.get_submodule(rel)
        weight = weight_matrix(module)
        if learned is not None:
            q, method, out_error = learned, "signround", None
        else:
            importance = None
            if entry.name in self.act:
                importance = channel_importance(stats[self.act[entry.name]], weight)
            hessian = hess[entry.name].hessian if entry.name in self.gptq or entry.name in self.head_of else None
            q, method, out_error = round_weight(weight, fmt, cfg, hessian=hessian, importance=importance)
        replace_module(root, rel, runtime_module(module, q))
        err = quant_error(weight, q)
        return ModuleQuant(entry.name, entry.level, entry.kind, tuple(q.shape), q.numel, q.fmt.name,
                           q.stored_bits, err["rel_fro"], err["sqnr_db"], time.perf_counter() - t0,
                           method=method, out_error=out_error)

    def outer(self, ckpt: LazyCheckpoint, state: RunState):
        """The modules outside the blocks, read now: statistics of the head on the streams, then the
        embedding and head quantized and tied as ``quantize_model`` ties them.

        ``quantize_model`` takes an untied head's statistics from the float model, and a tied head's
        for its embedding's feedback from the model with the blocks' modules rounded before the
        embedding: one-shot GPTQ none (its stream "q" ran the float blocks), sequential GPTQ's
        and signround's those its stream "q" ran (later ones are rounded after the head's pass)."""
        sk = self.skeleton
        for m in self._outer_leaves():
            prefix = _prefix_of(sk, m)
            ckpt.load_into(m, prefix, tied=_tied_keys(ckpt, m, prefix))
        self._place_outer(self.device)
        sk.tie_weights()
        after = {n: h for n, h in self.outside.items() if n not in self.stats}
        stats = {**self.stats, **self._head_stats(after, "f" if self.float_stream else "q")}
        fed = self._head_stats({h: True for h in sorted(set(self.head_of.values()))}, "q")
        hess = {**stats, **{e: fed[h] for e, h in self.head_of.items()}}  # by the embedding's name
        rest = [e for e in self.entries if not e.name.startswith(self.stack_name + ".")]
        records = [ModuleQuant(**{**r, "shape": tuple(r["shape"])}) for r in state.records]
        done = {r.name: r for r in records}
        for e in rest:
            done[e.name] = self._quantize(sk, e, e.name, stats, hess)
        self._place_outer("cpu")  # the quantized modules too, before any is tied to another
        qtensors = {e.name: sk.get_submodule(e.name).qtensor for e in rest}
        records = [done[e.name] for e in self.entries]
        for entry in self.levels.modules:
            if entry.tied_to is None or entry.tied_to not in qtensors:
                continue
            q = qtensors[entry.tied_to]
            bias = getattr(sk.get_submodule(entry.name), "bias", None)
            replace_module(sk, entry.name, QuantLinear(q, None if bias is None else bias.detach().clone()))
            records.append(ModuleQuant(entry.name, entry.level, entry.kind, tuple(q.shape), q.numel,
                                       q.fmt.name, 0, 0.0, float("inf"), 0.0, tied_to=entry.tied_to))
        inside = self.stack_name + "."
        modules = {n: m for n, m in sk.named_modules() if n and n != self.stack_name and not n.startswith(inside)}
        st = {k: v for k, v in sk.state_dict().items() if not k.startswith(inside)}
        return records, layer_parts(modules, st, {r.name: r for r in module_records(records)})

    def _outer_leaves(self) -> list[torch.nn.Module]:
        """The modules outside the blocks that hold tensors themselves (no children)."""
        outer = _outer_modules(self.skeleton, self.stack)
        return [m for m in self.skeleton.modules() if id(m) in outer and not list(m.children())]

    def _place_outer(self, device: torch.device | str) -> None:
        """Move the modules outside the blocks to ``device``, one by one (the skeleton's blocks are meta
        and cannot move). Those still on meta stay: the rotary embedding, back there once it gave the
        blocks their arguments (``_block_calls``), is not used again."""
        for m in self._outer_leaves():
            if not any(t.is_meta for t in (*m.parameters(), *m.buffers())):
                m.to(device)

    def _final(self, names: list[str]):
        """The final norm and the head, checked to be the one module ``names``: the stream's hidden
        states through the norm are the head's inputs, as in the model's forward pass."""
        norm = getattr(self.skeleton.get_submodule(self.stack_name.rpartition(".")[0]), "norm", None)
        head = self.skeleton.get_output_embeddings()
        if norm is None or head is None:
            raise ConfigError(f"{type(self.skeleton).__name__}: cannot find the final norm and head to "
                              "calibrate them streamed; run it in memory")
        if names != [next(n for n, m in self.skeleton.named_modules() if m is head)]:
            raise ConfigError(f"modules {names} outside the blocks need statistics; streaming calibrates the "
                              "head only: run it in memory")
        return norm, head

    def _head_stats(self, want: dict[str, bool], stream: str) -> dict[str, Any]:
        """Input statistics of the head (``want``: its name -> with a Hessian) on a stream, micro-batch
        by micro-batch as ``collect_input_stats`` sums them."""
        if not want:
            return {}
        norm, head = self._final(sorted(want))
        with InputStatsCollector(self.skeleton, want) as col, torch.no_grad():
            for h in self.streams[stream]:  # from the last block's device, one micro-batch at a time
                head(norm(h.to(self.device)))
                col.end_batch()
        return col.stats()


def _tied_keys(ckpt: LazyCheckpoint, module, prefix: str) -> dict[str, str]:
    """Keys of ``module`` the checkpoint leaves out because they are tied (read the owner's instead)."""
    missing = {k for k in module.state_dict() if prefix + k not in ckpt.shard_of}
    if not missing:
        return {}
    # A tied head has no tensor of its own; tie_weights() points it at the embedding afterwards.
    emb = [k for k in ckpt.shard_of if k.endswith("embed_tokens.weight") or k.endswith("wte.weight")]
    if not emb:
        raise KeyError(f"{ckpt.folder}: no tensor for {sorted(prefix + k for k in missing)}")
    return {k: emb[0] for k in missing}

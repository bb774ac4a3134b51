"""A package as a plain transformers checkpoint: the dequantized weights, nothing of uqcit needed.

``export_dequantized`` writes ``config.json``, ``model.safetensors`` (float weights equal to what
the package's quantized modules compute with), the tokenizer files and the generation config, so
that ``AutoModelForCausalLM.from_pretrained(out)`` loads it with transformers alone and gives the
logits ``load_package`` gives. The compression is lost on the way (the weights are float): this is
the export for runtimes that take nothing else.

What folds and what does not:

- low-rank compensation ``y = scale * (Ŵx + A(Bx)) + shift + bias`` folds exactly (up to float32
  rounding) into ``W' = scale[:, None] * (Ŵ + A @ B)`` and ``bias' = shift + bias``; a ``shift`` on
  a module whose architecture has no bias cannot be carried and is refused.
- online rotations (``rotation.safetensors``: rotated MLPs and norms, input pre-hooks) are refused.
  Input pre-hooks on a single linear layer are foldable in principle (``W' = Ŵ R``), but the rotated
  MLP and norm modules change the architecture, which a plain checkpoint cannot express.

>>> import tempfile
>>> from uqcit.package import export_package, load_package
>>> from uqcit.package.examples import tiny_quantized
>>> q, tok = tiny_quantized()
>>> with tempfile.TemporaryDirectory() as d:
...     out = export_dequantized(export_package(q, tok, f"{d}/pkg", source_model="tiny-llama"), f"{d}/hf")
...     sorted(p.name for p in out.iterdir())[:3]
['config.json', 'generation_config.json', 'model.safetensors']
"""
from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from uqcit.package.format import LoadedPackage, PackageError
from uqcit.package.load import load_package
from uqcit.runtime.modules import QuantEmbedding, QuantLinear
from uqcit.runtime.online import OnlineRotation, RotatedGatedMLP, RotatedRMSNorm
from uqcit.tensor.quant import dequantize


class ExportError(PackageError):
    """A package that the requested export cannot carry; the message names the way out."""


def as_loaded(package: str | os.PathLike | LoadedPackage) -> LoadedPackage:
    """``package`` itself when already loaded, else ``load_package(package)`` (verified, no progress bar)."""
    if isinstance(package, LoadedPackage):
        return package
    return load_package(package, progress=False)


def refuse_rotations(pkg: LoadedPackage, target: str) -> None:
    """Raise ``ExportError`` when ``pkg`` runs online rotations (listed in its metadata, or installed
    as modules in its model), which ``target`` cannot express."""
    rotated = sorted(pkg.metadata.get("online_rotations") or {})
    rotated += sorted(name for name, mod in pkg.model.named_modules()
                      if isinstance(mod, (OnlineRotation, RotatedGatedMLP, RotatedRMSNorm)))
    if rotated:
        raise ExportError(
            f"{pkg.path}: layers {', '.join(rotated[:4])}{' ...' if len(rotated) > 4 else ''} run online "
            f"rotations (rotation.safetensors), which a {target} cannot express; compress without an online "
            "rotation (only folded rotations) to export it, or load it with uqcit.load_package")


def dequantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Float32 state dict of ``model`` with every quantized module replaced by the weight it computes with.

    ``QuantLinear`` compensation folds in (see the module docstring); pruned modules already hold their
    masked dense weight. Keys are the plain transformers ones (``...q_proj.weight``); tied weights
    appear under every name that shares them.
    """
    state: dict[str, torch.Tensor] = {}
    quant_prefixes = []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            weight, bias = _folded_linear(name, mod)
            state[f"{name}.weight"] = weight
            if bias is not None:
                state[f"{name}.bias"] = bias
            quant_prefixes.append(f"{name}.")
        elif isinstance(mod, QuantEmbedding):
            state[f"{name}.weight"] = dequantize(mod.qtensor)
            quant_prefixes.append(f"{name}.")
    for key, value in model.state_dict().items():
        if not key.startswith(tuple(quant_prefixes)) and not key.endswith(".mask"):
            state[key] = value.detach().to(torch.float32) if value.is_floating_point() else value
    return state


def _folded_linear(name: str, mod: QuantLinear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W', b')`` with ``F.linear(x, W', b')`` equal to ``mod(x)`` (compensation folded)."""
    weight = dequantize(mod.qtensor)  # [out, in]
    bias = None if mod.bias is None else mod.bias.detach().to(torch.float32)
    comp = mod.compensation
    if comp is None:
        return weight, bias
    if comp.a is not None:
        weight = weight + dequantize(comp.a) @ dequantize(comp.b)  # [out, r] @ [r, in]
    if comp.scale is not None:
        scale = comp.scale.to(torch.float32)
        weight = weight * scale[:, None]
    if comp.shift is not None:
        if bias is None:
            raise ExportError(f"module {name}: its compensation adds a shift, and the architecture gives it no "
                              "bias to carry it; export without shift compensation, or load with uqcit")
        bias = bias + comp.shift.to(torch.float32)
    return weight, bias


def export_dequantized(package: str | os.PathLike | LoadedPackage, out: str | os.PathLike) -> Path:
    """Write ``package`` as a float32 transformers checkpoint at ``out`` (which must not exist); return ``out``.

    The folder holds ``config.json``, ``model.safetensors``, the tokenizer files and
    ``generation_config.json``; it is written beside ``out`` and renamed into place when complete.
    Raises ``ExportError`` for online rotations or an unfoldable compensation shift.
    """
    pkg = as_loaded(package)
    refuse_rotations(pkg, "plain transformers checkpoint")
    return write_checkpoint(pkg, out, dequantized_state(pkg.model), pkg.model.config)


def write_checkpoint(pkg: LoadedPackage, out: str | os.PathLike, state: dict[str, torch.Tensor], config) -> Path:
    """Write ``state`` as ``out/model.safetensors`` with ``config``, ``pkg``'s tokenizer and generation
    config, beside ``out`` and renamed into place when complete; return ``out`` (which must not exist).

    A tied output layer is left out (transformers re-ties it); an untied one unties the written
    config. Neither ``state`` nor ``config`` is changed.
    """
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; choose a new folder")
    state, config = dict(state), copy.deepcopy(config)
    tied = tied_output_key(pkg.model, state)
    if tied is not None:
        state.pop(tied)  # transformers re-ties it from the input embedding
    elif getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False  # the package stores its own output layer: keep it
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        config.to_json_file(partial / "config.json")
        save_file({k: v.contiguous() for k, v in state.items()}, str(partial / "model.safetensors"),
                  metadata={"format": "pt"})
        if pkg.tokenizer is not None:
            pkg.tokenizer.save_pretrained(partial)
        if getattr(pkg.model, "generation_config", None) is not None:
            pkg.model.generation_config.save_pretrained(partial)
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def tied_output_key(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """The output-embedding weight's key in ``state`` when the config ties it to the input embedding
    and the package kept them equal (a tied package), else None (the output layer must be written)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return None
    names = {id(mod): name for name, mod in model.named_modules()}
    out_key = f"{names.get(id(model.get_output_embeddings()))}.weight"
    in_key = f"{names.get(id(model.get_input_embeddings()))}.weight"
    if out_key in state and in_key in state and torch.equal(state[out_key], state[in_key]):
        return out_key
    return None

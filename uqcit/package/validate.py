"""Checks that run before a package's model is built: every name, type, shape and size it declares.

``plan_load`` checks ``config.json``'s values, builds the model's skeleton on the meta device
(names, shapes and ties without memory), checks every metadata entry against it, and returns a
``LoadPlan``: the exact tensors (name, safetensors dtype, shape) each file it will read must
hold, from the format's layout (``uqcit.tensor.quant.tensor_layout``). ``check_tensors`` holds a
file's header to that plan before its data is read; ``check_data`` checks what only the data
tells (mask popcounts, sparse indices, rotation orders), still before the real model exists.

Layer folders come from the naming rule (``uqcit.core.names.layer_dir``), never from the
metadata's strings: an entry whose ``layer`` differs from the rule is refused. Every failure is
a ``PackageError`` naming the file and the field.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from uqcit.core.names import block_of, layer_dir
from uqcit.package.format import METADATA_FILE, PackageError
from uqcit.runtime.online import is_rotation_key
from uqcit.tensor.formats import QuantFormat, parse_format
from uqcit.tensor.packing import packed_nbytes, unpack
from uqcit.tensor.quant import tensor_layout
from uqcit.tensor.sparse import VALUE_DTYPES, index_dtype, sparse_storage

MAX_DIM = 2**20  # largest size, count or length config.json may declare (vocab, widths, layers, heads)
ALLOC_FACTOR = 64  # model bytes may exceed the weight files' bytes this much (2-bit codes, sparse storage)
ALLOC_MARGIN = 256 << 20  # plus this much (float buffers, tiny packages)
MAX_HEADER = 100 << 20  # a safetensors header larger than this is refused unread
MAX_MODULES = 1024  # most layers or experts config.json may declare (each is Python objects to build)
DIM_KEYS = {**dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                             "num_key_value_heads", "max_position_embeddings", "head_dim", "n_embd", "n_head",
                             "n_positions", "n_inner", "n_ctx", "type_vocab_size"), MAX_DIM),
            **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "num_experts", "num_local_experts"),
                            MAX_MODULES)}
KINDS = ("linear", "embedding", "masked_linear", "masked_embedding")
ENTRY_KEYS = {"layer": (str,), "kind": (str,), "shape": (list,), "format": (str,), "tied_to": (str, type(None)),
              "level": (int, type(None)), "has_bias": (bool,), "padding_idx": (int, type(None)),
              "compensation": (dict, type(None))}
ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
             torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64", torch.bool: "BOOL"}
FLOATS = ("F32", "F16", "BF16")
WEIGHTS, ROTATION = "weights.safetensors", "rotation.safetensors"


@dataclasses.dataclass(frozen=True)
class Expect:
    """What one stored tensor must be: a safetensors dtype and a shape (None: 1-D, at most ``most``)."""

    dtypes: tuple[str, ...]
    shape: tuple[int, ...] | None
    most: int = 0


@dataclasses.dataclass
class LoadPlan:
    """What ``load_package`` may read and build, every part checked against the architecture."""

    model_cls: type
    config: Any
    weights: dict[str, dict[str, Expect]]  # layer folder -> tensor name -> expectation
    sparse: dict[str, tuple[str, int, str]]  # pruned module -> (layer, numel, value dtype); sizes follow kept
    quantized: list[tuple[str, str, int, QuantFormat]]  # (layer, tensor prefix, numel, format), factors too
    rotations: dict[str, dict[str, Expect]]  # layer folder -> rotation tensor -> expectation
    rotation_width: dict[str, int]  # rotation site -> its order
    check_unlisted_rotations: bool  # metadata from before online_rotations was recorded


def check_tree(root: Path) -> None:
    """Refuse symlinks and anything but plain files and folders anywhere in the package."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode):
                raise PackageError(f"{p}: symbolic links are not allowed in a package; replace it by the file")
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise PackageError(f"{p}: not a regular file or folder; remove it from the package")


def check_config(path: Path, config: Any) -> None:
    """``config.json``'s sizes: integers in [1, MAX_DIM] (layers, experts: MAX_MODULES), finite numbers,
    before transformers reads it."""
    if not isinstance(config, dict):
        raise PackageError(f"{path}: must hold a JSON object; the package is corrupt")
    for key, most in DIM_KEYS.items():
        v = config.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= most):
            raise PackageError(f"{path}: {key} must be an integer in [1, {most}], got {str(v)[:40]}; "
                               "the package is corrupt")
    for key, v in config.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise PackageError(f"{path}: {key} must be finite, got {v}; the package is corrupt")


def check_config_types(path: Path, data: Mapping[str, Any], config: Any) -> None:
    """Each value of ``config.json`` has the type of the config class's default (a flag stays a bool)."""
    try:
        defaults = type(config)()
    except config_errors():
        return  # a config class without defaults: its own validation is all there is
    for key, value in data.items():
        default = getattr(defaults, key, None)
        if default is None or value is None and not isinstance(default, bool):
            continue  # a size left to its derived default (e.g. num_key_value_heads) is checked by shape
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                isinstance(default, float) or isinstance(value, int))
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            continue
        if not ok:
            raise PackageError(f"{path}: {key} must be a {type(default).__name__} like the default "
                               f"{default!r}, got {str(value)[:40]!r}; the package is corrupt")


def config_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises on a config it refuses (its strict dataclasses raise their own type)."""
    from huggingface_hub.errors import StrictDataclassError

    return (ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError, IndexError, RuntimeError,
            OverflowError, AssertionError, NotImplementedError, ImportError, StrictDataclassError)


def model_class(root: Path, name: str, config: Any) -> type:
    """The transformers class ``model_class`` names, if it is a model class for ``config``."""
    import transformers

    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise PackageError(f"{root / METADATA_FILE}: model_class {name!r} is not a transformers model class; "
                           "the package is corrupt")
    if not isinstance(config, getattr(cls, "config_class", None) or object):
        raise PackageError(f"{root / METADATA_FILE}: model_class {name} does not take the "
                           f"{type(config).__name__} of config.json; the package is corrupt")
    return cls


def build_model(root: Path, cls: type, config: Any, device: str | None = None) -> nn.Module:
    """``cls`` from ``config`` (on ``device``); the caller's RNG is left as it was."""
    gen_state = torch.random.get_rng_state()
    try:
        if device is None:
            return cls._from_config(config)
        with torch.device(device):
            return cls._from_config(config)
    except config_errors() as exc:
        raise PackageError(f"{root / 'config.json'}: no {cls.__name__} can be built from it "
                           f"({type(exc).__name__}: {str(exc)[:200]}); the package is corrupt") from exc
    finally:
        torch.random.set_rng_state(gen_state)  # building must not disturb the caller's RNG


def plan_load(root: Path, meta: Mapping[str, Any], config: Any) -> LoadPlan:
    """Check every metadata entry against the model ``config`` builds (on the meta device)."""
    cls = model_class(root, meta["model_class"], config)
    skeleton = build_model(root, cls, config, "meta")
    plan = LoadPlan(cls, config, {}, {}, [], {}, {}, meta.get("online_rotations") is None)
    mods = dict(skeleton.named_modules())
    sd = skeleton.state_dict(keep_vars=True)
    modules, floats = meta["modules"], meta["float_tensors"]
    for name, entry in modules.items():
        _check_module(root, plan, name, entry, modules, mods)
    stored_at: dict[int, str] = {}
    for key, entry in floats.items():
        _check_float(root, plan, key, entry, floats, modules, sd, stored_at)
    missing = [k for k in sd if k not in floats and k.rsplit(".", 1)[0] not in modules]
    if missing:
        raise PackageError(f"{root / METADATA_FILE}: float_tensors lacks {len(missing)} tensor(s) a "
                           f"{cls.__name__} needs, e.g. {missing[:3]}; the package is incomplete")
    for layer, keys in (meta.get("online_rotations") or {}).items():
        _check_rotations(root, plan, layer, keys, mods)
    model_bytes = sum(t.numel() * t.element_size() for t in skeleton.parameters()) + sum(
        t.numel() * t.element_size() for t in skeleton.buffers())
    files = sum(_size(root / "layers" / layer / WEIGHTS) for layer in plan.weights)
    if model_bytes > ALLOC_FACTOR * files + ALLOC_MARGIN:
        raise PackageError(f"{root / 'config.json'}: declares a {model_bytes / 2**30:.2f} GiB model for "
                           f"{files / 2**20:.1f} MiB of weight files; the package is corrupt")
    return plan


def _size(path: Path) -> int:
    """Bytes of a weight file, plain or encrypted (``.enc``); 0 when absent (refused later)."""
    enc = path.with_name(path.name + ".enc")
    return path.stat().st_size if path.is_file() else enc.stat().st_size if enc.is_file() else 0


def _where(root: Path, what: str) -> str:
    return f"{root / METADATA_FILE}: {what}"


def _weight_shape(mod: nn.Module) -> tuple[int, ...] | None:
    """``[out, in]`` of a Linear/Conv1D, ``[num, dim]`` of an Embedding, None for other modules."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(mod, (nn.Linear, nn.Embedding)):
        return tuple(mod.weight.shape)
    if isinstance(mod, Conv1D):
        return tuple(reversed(mod.weight.shape))
    return None


def _check_module(root: Path, plan: LoadPlan, name: str, entry: Any, modules: Mapping[str, Any],
                  mods: Mapping[str, nn.Module]) -> None:
    field = f"modules.{name}"
    if not isinstance(entry, dict):
        raise PackageError(_where(root, f"{field} must be an object; the package is corrupt"))
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise PackageError(_where(root, f"{field} has unknown key(s) {unknown}; the package is corrupt"))
    for key in ("layer", "kind", "shape", "format"):
        if key not in entry:
            raise PackageError(_where(root, f"{field} lacks key {key!r}; the package is corrupt"))
    for key, value in entry.items():
        if isinstance(value, bool) and bool not in ENTRY_KEYS[key] or not isinstance(value, ENTRY_KEYS[key]):
            raise PackageError(_where(root, f"{field}.{key} has the wrong type ({type(value).__name__}); "
                                            "the package is corrupt"))
    kind, layer = entry["kind"], layer_dir(block_of(name))
    if entry["layer"] != layer:
        raise PackageError(_where(root, f"{field}.layer is {entry['layer'][:60]!r}, but a module of that name "
                                        f"lives in {layer!r}; the package is corrupt"))
    if kind not in KINDS:
        raise PackageError(_where(root, f"{field}.kind {kind[:40]!r} is not one of {KINDS}"))
    mod = mods.get(name)
    shape = _weight_shape(mod) if mod is not None else None
    is_emb = kind.endswith("embedding")
    if shape is None or is_emb != isinstance(mod, nn.Embedding):
        raise PackageError(_where(root, f"{field}: a {plan.model_cls.__name__} built from config.json has no "
                                        f"{kind.replace('_', ' ')} {name!r}; the package is corrupt"))
    if entry["shape"] != list(shape):
        raise PackageError(_where(root, f"{field}.shape {str(entry['shape'])[:40]} is not the {list(shape)} "
                                        "config.json builds; the package is corrupt"))
    has_bias = bool(entry.get("has_bias"))
    if has_bias != (getattr(mod, "bias", None) is not None):
        raise PackageError(_where(root, f"{field}.has_bias is {has_bias}, the architecture says otherwise"))
    if kind == "masked_embedding" and entry.get("padding_idx") != mod.padding_idx:
        raise PackageError(_where(root, f"{field}.padding_idx {entry.get('padding_idx')} is not the "
                                        f"architecture's {mod.padding_idx}"))
    masked = kind.startswith("masked")
    if masked:
        dtype = entry["format"].removeprefix("sparse-")
        if not entry["format"].startswith("sparse-") or dtype not in VALUE_DTYPES:
            raise PackageError(_where(root, f"{field}.format {entry['format'][:40]!r} is not sparse-<dtype> "
                                            f"with a dtype of {sorted(VALUE_DTYPES)}"))
    else:
        try:
            fmt = parse_format(entry["format"])
        except ValueError as exc:
            raise PackageError(_where(root, f"{field}.format: {exc}")) from exc
    numel = math.prod(shape)
    expect = plan.weights.setdefault(layer, {})
    if has_bias:
        expect[f"{name}.bias"] = Expect(FLOATS, (shape[0],))
    if entry.get("compensation") is not None:
        if kind != "linear":
            raise PackageError(_where(root, f"{field}.compensation: only quantized linear layers carry one"))
        _check_compensation(root, plan, name, entry["compensation"], shape, layer)
    tied = entry.get("tied_to")
    if tied is not None:
        owner = modules.get(tied)
        if not isinstance(owner, dict) or owner.get("tied_to") is not None or tied not in mods or \
                mods[tied].weight is not mod.weight or owner.get("format") != entry["format"] or \
                masked and owner.get("kind") not in (kind, "masked_embedding"):
            raise PackageError(_where(root, f"{field}.tied_to {tied[:60]!r}: the architecture built from "
                                            "config.json does not tie these weights; the package is corrupt"))
        return
    if masked:
        plan.sparse[name] = (layer, numel, dtype)
        expect[f"{name}.values"] = Expect((ST_DTYPES[VALUE_DTYPES[dtype]],), None, numel)
    else:
        _expect_quantized(plan, layer, f"{name}.", numel, fmt)


def _expect_quantized(plan: LoadPlan, layer: str, prefix: str, numel: int, fmt: QuantFormat) -> None:
    for part, spec in tensor_layout(numel, fmt).items():
        plan.weights.setdefault(layer, {})[prefix + part] = Expect((ST_DTYPES[spec.dtype],), (spec.numel,))
    if fmt.mixed:
        plan.quantized.append((layer, prefix, numel, fmt))


def _check_compensation(root: Path, plan: LoadPlan, name: str, comp: Mapping[str, Any],
                        shape: tuple[int, ...], layer: str) -> None:
    field = f"modules.{name}.compensation"
    out, inp = shape
    unknown = sorted(set(comp) - {"lowrank", "scale", "shift", "stored_bits"})
    if unknown:
        raise PackageError(_where(root, f"{field} has unknown key(s) {[k[:40] for k in unknown]}"))
    lr = comp.get("lowrank")
    if lr is not None:
        try:
            r = lr["rank"]
            if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(out, inp):
                raise ValueError(f"rank {r!r} is not in [1, {min(out, inp)}]")
            for part, want in (("a", [out, r]), ("b", [r, inp])):
                if lr[part]["shape"] != want:
                    raise ValueError(f"{part}.shape {str(lr[part]['shape'])[:40]} is not {want}")
                _expect_quantized(plan, layer, f"{name}.compensation.{part}.", math.prod(want),
                                  parse_format(lr[part]["format"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PackageError(_where(root, f"{field}.lowrank: {type(exc).__name__} {exc}")) from exc
    for part in ("scale", "shift"):
        if not isinstance(comp.get(part, False), bool):
            raise PackageError(_where(root, f"{field}.{part} must be true or false"))
        if comp.get(part):
            plan.weights[layer][f"{name}.compensation.{part}"] = Expect(("F16",), (out,))


def _check_float(root: Path, plan: LoadPlan, key: str, entry: Any, floats: Mapping[str, Any],
                 modules: Mapping[str, Any], sd: Mapping[str, torch.Tensor], stored_at: dict[int, str]) -> None:
    field = f"float_tensors.{key}"
    if key not in sd or key.rsplit(".", 1)[0] in modules:
        raise PackageError(_where(root, f"{field}: not a float tensor of a {plan.model_cls.__name__} built "
                                        "from config.json; the package is corrupt"))
    if not isinstance(entry, dict):
        raise PackageError(_where(root, f"{field} must be an object; the package is corrupt"))
    if "tied_to" in entry:
        tied = entry["tied_to"]
        if set(entry) != {"tied_to"} or not isinstance(tied, str) or not isinstance(floats.get(tied), dict) \
                or "tied_to" in floats[tied] or sd.get(tied) is not sd[key]:
            raise PackageError(_where(root, f"{field}.tied_to: the architecture built from config.json does "
                                            "not tie these tensors; the package is corrupt"))
        return
    if set(entry) != {"layer", "dtype"}:
        raise PackageError(_where(root, f"{field} must have exactly the keys layer and dtype"))
    layer, dtype = layer_dir(block_of(key)), entry["dtype"]
    if entry["layer"] != layer:
        raise PackageError(_where(root, f"{field}.layer is {str(entry['layer'])[:60]!r}, but that tensor lives "
                                        f"in {layer!r}; the package is corrupt"))
    st = ST_DTYPES.get(getattr(torch, dtype, None)) if isinstance(dtype, str) and dtype.isidentifier() else None
    if st is None:
        raise PackageError(_where(root, f"{field}.dtype {str(dtype)[:40]!r} is not a tensor dtype"))
    if id(sd[key]) in stored_at:  # two stored tensors the architecture ties: one would overwrite the other
        raise PackageError(_where(root, f"{field}: config.json ties it to {stored_at[id(sd[key])]}, "
                                        "which is stored too; the package is corrupt"))
    stored_at[id(sd[key])] = key
    if ST_DTYPES.get(sd[key].dtype) != st:  # e.g. a config.json dtype the stored floats do not have
        raise PackageError(_where(root, f"{field}.dtype is {dtype}, a model built from config.json holds "
                                        f"{str(sd[key].dtype).removeprefix('torch.')}; the package is corrupt"))
    plan.weights.setdefault(layer, {})[key] = Expect((st,), tuple(sd[key].shape))


def _check_rotations(root: Path, plan: LoadPlan, layer: str, keys: list[str], mods: Mapping[str, nn.Module]) -> None:
    field = f"online_rotations.{layer[:60]}"
    for key in keys:
        site, _, part = key.rpartition(".")
        owner_name, _, kind = site.rpartition(".")
        owner = mods.get(owner_name)
        if not is_rotation_key(key) or layer_dir(block_of(key)) != layer or owner is None:
            raise PackageError(_where(root, f"{field}: {key[:80]!r} is not a rotation of a module in {layer!r}"))
        width = _rotation_width(owner, kind)
        if width is None:
            raise PackageError(_where(root, f"{field}: {owner_name} cannot carry a {kind}"))
        plan.rotation_width[site] = width
        spec = {"matrix": Expect(("F32",), (width, width)), "signs": Expect(("U8",), (packed_nbytes(width, 1),)),
                "layout": Expect(("I64",), (2,))}[part]
        plan.rotations.setdefault(layer, {})[key] = spec
    sites: dict[str, set[str]] = {}
    for key in keys:
        site, _, part = key.rpartition(".")
        sites.setdefault(site, set()).add(part)
    for site, parts in sites.items():
        if parts not in ({"matrix"}, {"signs", "layout"}):
            raise PackageError(_where(root, f"{field}: rotation {site} lists {sorted(parts)}, not matrix or "
                                            "signs and layout"))


def _rotation_width(owner: nn.Module, kind: str) -> int | None:
    """The order a rotation of ``kind`` at ``owner`` must have (``uqcit.runtime.online``'s sites)."""
    if kind == "online_rotation":  # rotates the gated MLP's down_proj input
        down = getattr(owner, "down_proj", None)
        shape = _weight_shape(down) if isinstance(down, nn.Module) else None
        return shape[1] if shape else None
    if kind == "scale_rotation":  # an RMSNorm's scale vector
        w = getattr(owner, "weight", None)
        return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() == 1 else None
    shape = _weight_shape(owner)  # input_rotation of a Linear/Conv1D
    return shape[1] if shape and not isinstance(owner, nn.Embedding) else None


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (safetensors dtype, shape) of a safetensors file, from its header alone."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if not 0 < n <= min(size - 8, MAX_HEADER):
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            shape = info["shape"]
            if not isinstance(info["dtype"], str) or not isinstance(shape, list) or not all(
                    isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
                raise ValueError(f"tensor {name[:80]!r} has a malformed entry")
            out[name] = (info["dtype"], tuple(shape))
        return out
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise PackageError(f"{path}: not a readable safetensors header ({type(exc).__name__}: "
                           f"{str(exc)[:120]}); the package is corrupt") from exc


def specs_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``read_header``'s form for tensors already in memory (decrypted files)."""
    return {k: (ST_DTYPES.get(t.dtype, str(t.dtype)), tuple(t.shape)) for k, t in tensors.items()}


def check_tensors(path: Path, specs: Mapping[str, tuple[str, tuple[int, ...]]], expect: Mapping[str, Expect],
                  sparse: Mapping[str, tuple[str, int, str]] | None = None) -> None:
    """The file holds exactly the tensors the metadata names, each with its dtype and shape."""
    expect = dict(expect)
    for name, (_, numel, dtype) in (sparse or {}).items():
        values = specs.get(f"{name}.values")
        if values is not None and len(values[1]) == 1 and values[1][0] <= numel:
            kept = values[1][0]
            if sparse_storage(numel, kept, dtype)[0] == "bitmap":
                expect[f"{name}.bitmap"] = Expect(("U8",), (packed_nbytes(numel, 1),))
            else:
                expect[f"{name}.indices"] = Expect((ST_DTYPES[index_dtype(numel)],), (kept,))
    extra, missing = sorted(set(specs) - set(expect)), sorted(set(expect) - set(specs))
    if extra:
        raise PackageError(f"{path}: holds tensor(s) the metadata does not name, e.g. {[e[:80] for e in extra[:3]]}; "
                           "the package is corrupt")
    if missing:
        raise PackageError(f"{path}: lacks tensor(s) {missing[:3]} the metadata names; the package is incomplete")
    for name, want in expect.items():
        dtype, shape = specs[name]
        ok_shape = shape == want.shape if want.shape is not None else len(shape) == 1 and shape[0] <= want.most
        if dtype not in want.dtypes or not ok_shape:
            need = want.shape if want.shape is not None else f"(<= {want.most},)"
            raise PackageError(f"{path}: tensor {name} is {dtype} {shape}, the metadata's format needs "
                               f"{'/'.join(want.dtypes)} {need}; the package is corrupt")


def check_data(root: Path, plan: LoadPlan, state: Mapping[str, torch.Tensor],
               rotations: Mapping[str, torch.Tensor]) -> None:
    """What only the data tells: mask popcounts, sparse indices, rotation layouts."""
    for layer, prefix, numel, fmt in plan.quantized:
        set_bits = int(unpack(state[prefix + "mask"], 1, numel).sum())
        if set_bits != fmt.high_count(numel):
            raise PackageError(f"{root / 'layers' / layer / WEIGHTS}: mask {prefix}mask marks {set_bits} "
                               f"high-precision weights, its format {fmt.name} stores {fmt.high_count(numel)}; "
                               "the package is corrupt")
    for name, (layer, numel, _) in plan.sparse.items():
        kept = state[f"{name}.values"].numel()
        path = root / "layers" / layer / WEIGHTS
        if f"{name}.bitmap" in state:
            bitmap = state[f"{name}.bitmap"]
            marked = int(unpack(bitmap, 1, 8 * bitmap.numel()).sum())  # stray bits past numel count too
            if marked != kept or int(unpack(bitmap, 1, numel).sum()) != kept:
                raise PackageError(f"{path}: {name}.bitmap marks {marked} kept weights for {kept} stored "
                                   "values; the package is corrupt")
        else:
            idx = state[f"{name}.indices"].to(torch.int64)
            if idx.numel() and (int(idx.max()) >= numel or int(idx.min()) < 0 or
                                not bool((idx[1:] > idx[:-1]).all())):
                raise PackageError(f"{path}: {name}.indices must be increasing positions in [0, {numel}); "
                                   "the package is corrupt")
    for key, t in rotations.items():
        if key.endswith(".layout"):
            site = key.rpartition(".")[0]
            m, b = (int(v) for v in t.tolist())
            if m < 2 or b < 1 or m * b != plan.rotation_width[site]:
                raise PackageError(f"{root / 'layers' / layer_dir(block_of(key)) / ROTATION}: {key} is "
                                   f"[{m}, {b}], not a factoring of order {plan.rotation_width[site]}")

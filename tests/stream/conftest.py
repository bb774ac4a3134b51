"""Fixtures of the streaming tests: a tiny random model saved as a local folder, package bytes."""
from pathlib import Path

import pytest


@pytest.fixture
def save_tiny():
    """``save_tiny(family, folder)``: a tiny random model and its tokenizer written with save_pretrained."""
    from uqcit.inputs.tiny import tiny_model

    def save(family: str, folder: Path) -> Path:
        model, tok = tiny_model(family)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        return folder
    return save


@pytest.fixture
def package_files():
    """``package_files(root)``: every file under ``root`` by relative path -> its bytes."""
    def read(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    return read

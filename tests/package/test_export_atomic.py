"""Export never leaves the target without a whole package: faults at every step, races, disk full, bytes.

A simulated kill raises at one file-system step (``swap.FAULT_HOOK``) with the exporter's own
cleanup switched off (a killed process runs no ``finally``); after each, the target must hold a
package that verifies (the old one or the new one), and the next export must leave no
temporary folder. Real SIGKILLs are benchmarks/export_faults.py.
"""
import errno
import hashlib
import json
import os
import stat
import threading

import pytest

from uqcit.inputs.tiny import tiny_model
from uqcit.package import (
    PackageError, SecurityError, export_package, load_package, read_metadata, stage_package, write_validation)
from uqcit.package import export as export_module
from uqcit.package import swap
from uqcit.package.secure import generate_signing_key, verify_package
from uqcit.package.secure.signing import MANIFEST_FILE, verify_manifest
from uqcit.stages.levels import analyze_levels
from uqcit.stages.plan import PlanConfig, build_plan
from uqcit.stages.quantize import quantize_model


class SimulatedKill(BaseException):
    """Raised at a step; not an Exception, so nothing on the way catches it."""


@pytest.fixture(scope="module")
def quantized():
    model, tok = tiny_model("llama", seed=0)
    levels = analyze_levels(model)
    plan = build_plan(levels, PlanConfig(preset="uniform", bits=4, group_size=32))
    return quantize_model(model, levels, plan, progress=False).export_record(), tok


@pytest.fixture(scope="module")
def key():
    return generate_signing_key()


def _leftovers(target):
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def _whole(target, key=None) -> str:
    """The target verifies (manifest, and signature if signed); returns which run wrote it."""
    verify_manifest(target)
    if key is not None:
        verify_package(target, key.public_key())
    return read_metadata(target)["source_model"]


def _steps(quantized, target, **kw) -> list[str]:
    seen: list[str] = []
    swap.FAULT_HOOK = seen.append
    try:
        export_package(*quantized, target, source_model="probe", **kw)
    finally:
        swap.FAULT_HOOK = None
    return seen


def _occurrences(steps: list[str]) -> list[tuple[str, int]]:
    """Each step as (name, how many times it came before): a kill point that recovery cannot shift."""
    return [(name, steps[:i].count(name)) for i, name in enumerate(steps)]


def _kill_at(at: tuple[str, int], target):
    seen: list[str] = []

    def hook(name):
        if name == "stage:mkdir":  # the next export: stale folders of the last kill are gone by now
            assert len([n for n in _leftovers(target) if ".tmp-" in n or ".old-" in n]) == 1  # its own
        seen.append(name)
        if (name, seen.count(name) - 1) == at:
            raise SimulatedKill(name)
    return hook


@pytest.mark.parametrize("signed", [False, True])
def test_a_kill_at_every_step_leaves_a_whole_package_and_the_next_export_cleans_up(
        quantized, key, tmp_path, monkeypatch, signed):
    target = tmp_path / "pkg"
    kw = {"signing_key": key} if signed else {}
    export_package(*quantized, target, source_model="old", **kw)
    steps = _steps(quantized, tmp_path / "probe" / "pkg", **kw)  # the same steps, for a new target
    steps = _steps(quantized, tmp_path / "probe" / "pkg", **kw)  # ... and for an existing one
    assert "swap:exchanged" in steps and len(steps) > 20
    monkeypatch.setattr(export_module, "_discard", lambda path: None)  # a killed process cleans nothing
    now = "old"
    for i, at in enumerate(_occurrences(steps)):
        monkeypatch.setattr(swap, "FAULT_HOOK", _kill_at(at, target))
        with pytest.raises(SimulatedKill):
            export_package(*quantized, target, source_model=f"new-{i}", **kw)
        assert _whole(target, key if signed else None) in (now, f"new-{i}"), at
        now = _whole(target)
    monkeypatch.setattr(swap, "FAULT_HOOK", None)
    export_package(*quantized, target, source_model="last", **kw)
    assert _whole(target, key if signed else None) == "last"
    assert _leftovers(target) == []  # no temporary folder, no lock file


def test_fallback_without_renameat2_restores_a_stranded_package(quantized, tmp_path, monkeypatch):
    target = tmp_path / "pkg"
    export_package(*quantized, target, source_model="old")
    monkeypatch.setattr(swap, "exchange", lambda a, b: False)  # a system without RENAME_EXCHANGE
    discard = export_module._discard
    monkeypatch.setattr(export_module, "_discard", lambda path: None)

    def hook(name):
        if name == "swap:fallback-old-moved":
            raise SimulatedKill(name)
    monkeypatch.setattr(swap, "FAULT_HOOK", hook)
    with pytest.raises(SimulatedKill):
        export_package(*quantized, target, source_model="new")
    assert not target.exists()  # the stated window of the fallback: between its two renames
    monkeypatch.setattr(swap, "FAULT_HOOK", None)
    monkeypatch.setattr(export_module, "_discard", discard)
    with pytest.raises(ZeroDivisionError):
        with stage_package(*quantized, target, source_model="aborted"):
            assert _whole(target) == "old"  # the next export put the stranded package back first
            raise ZeroDivisionError
    assert _whole(target) == "old" and _leftovers(target) == []
    export_package(*quantized, target, source_model="new")
    assert _whole(target) == "new" and _leftovers(target) == []


@pytest.mark.parametrize("call", ["replace", "rename"])
def test_every_os_rename_failing_keeps_the_old_package(quantized, tmp_path, monkeypatch, call):
    """os.replace: every file write (core.io.atomic_write); os.rename: the swap's fallback renames."""
    target = tmp_path / "pkg"
    export_package(*quantized, target, source_model="old")
    if call == "rename":
        monkeypatch.setattr(swap, "exchange", lambda a, b: False)
    real = getattr(os, call)
    count = [0]

    def counting(*a, **k):
        count[0] += 1
        return real(*a, **k)
    monkeypatch.setattr(os, call, counting)
    export_package(*quantized, target, source_model="old")
    total = count[0]
    assert total >= (20 if call == "replace" else 2)
    for n in range(total):
        def failing(*a, n=n, **k):
            count[0] += 1
            if count[0] - 1 == n:
                raise OSError(errno.EIO, "simulated I/O error")
            return real(*a, **k)
        count[0] = 0
        monkeypatch.setattr(os, call, failing)
        with pytest.raises(OSError):
            export_package(*quantized, target, source_model=f"new-{n}")
        monkeypatch.setattr(os, call, real)
        assert _whole(target) == "old" and _leftovers(target) == [], n


def test_a_failing_exchange_keeps_the_old_package(quantized, tmp_path, monkeypatch):
    target = tmp_path / "pkg"
    export_package(*quantized, target, source_model="old")

    def failing(a, b):
        raise OSError(errno.EIO, "simulated renameat2 failure")
    monkeypatch.setattr(swap, "exchange", failing)
    with pytest.raises(OSError, match="simulated renameat2"):
        export_package(*quantized, target, source_model="new")
    assert _whole(target) == "old" and _leftovers(target) == []


def test_disk_full_names_the_file_and_keeps_the_old_package(quantized, tmp_path, monkeypatch):
    target = tmp_path / "pkg"
    export_package(*quantized, target, source_model="old")
    before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    real = export_module.save_safetensors

    def full(tensors, path, metadata=None):
        if "layer_002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata)
    monkeypatch.setattr(export_module, "save_safetensors", full)
    with pytest.raises(PackageError, match=r"layers/layer_002/weights.safetensors: disk full.*intact"):
        export_package(*quantized, target, source_model="new")
    assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert _leftovers(target) == []


def test_concurrent_exporters_both_finish_one_after_the_other(quantized, key, tmp_path):
    target = tmp_path / "pkg"
    export_package(*quantized, target, source_model="old", signing_key=key)
    start, errors = threading.Barrier(3), []

    def run(name):
        start.wait()
        try:
            export_package(*quantized, target, source_model=name, signing_key=key)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(f"run-{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and _whole(target, key) in ("run-0", "run-1", "run-2")
    assert _leftovers(target) == []


def test_a_second_exporter_times_out_clearly_while_the_first_holds_the_lock(quantized, tmp_path):
    target = tmp_path / "pkg"
    with stage_package(*quantized, target, source_model="first") as staged:
        with pytest.raises(PackageError, match=r"\.pkg\.lock: another export to .*pkg holds this lock"):
            export_package(*quantized, target, source_model="second", lock_timeout=0.2)
        staged.commit()
    assert _whole(target) == "first" and _leftovers(target) == []


def test_only_a_package_or_an_empty_folder_is_replaced(quantized, tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    with pytest.raises(PackageError, match="notes.txt: exists and is not a folder"):
        export_package(*quantized, afile)
    assert afile.read_text() == "keep me"
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.jpg").write_bytes(b"x")
    with pytest.raises(PackageError, match="photos: exists and is not a UQCIT package"):
        export_package(*quantized, other)
    assert os.listdir(other) == ["a.jpg"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _whole(export_package(*quantized, empty, source_model="e")) == "e"
    link = tmp_path / "link"
    link.symlink_to(empty)
    export_package(*quantized, link, source_model="via-link")
    assert link.is_symlink() and _whole(empty) == "via-link"


def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_same_record_twice_gives_byte_identical_files_and_fixed_modes(quantized, key, tmp_path, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    a = export_package(*quantized, tmp_path / "a", reproducible=True, signing_key=key)
    b = export_package(*quantized, tmp_path / "b", reproducible=True, signing_key=key)
    assert _digests(a) == _digests(b) and MANIFEST_FILE in _digests(a)
    assert read_metadata(a)["created"] == "1970-01-01T00:00:00+0000"
    modes = {stat.S_IMODE(p.stat().st_mode) for p in a.rglob("*")}
    assert modes == {0o644, 0o755} and stat.S_IMODE(a.stat().st_mode) == 0o755
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    c = export_package(*quantized, tmp_path / "c")
    assert read_metadata(c)["created"] == "2023-11-14T22:13:20+0000"
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(ValueError, match="SOURCE_DATE_EPOCH='yesterday' is not an integer"):
        export_package(*quantized, tmp_path / "d")


def test_default_manifest_check_names_a_flipped_missing_or_extra_file(quantized, tmp_path):
    path = export_package(*quantized, tmp_path / "pkg")
    w = path / "layers" / "layer_001" / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0x10  # one bit of weight data: the loader alone would not notice
    w.write_bytes(bytes(data))
    with pytest.raises(SecurityError, match=r"layer_001/weights.safetensors: modified \(SHA-256"):
        load_package(path, progress=False)
    load_package(path, progress=False, verify=False)  # the explicit opt-out
    (path / "layers" / "outer" / "extra.bin").write_bytes(b"x")
    (path / "validation" / "perplexity.json").unlink()
    with pytest.raises(SecurityError) as err:
        verify_manifest(path)
    assert {rel for rel, _ in err.value.problems} == {
        "layers/layer_001/weights.safetensors", "layers/outer/extra.bin", "validation/perplexity.json"}
    (path / MANIFEST_FILE).write_text("[]")
    with pytest.raises(SecurityError, match="uqcit_manifest.json: not a valid manifest"):
        verify_manifest(path)
    (path / MANIFEST_FILE).unlink()
    with pytest.raises(SecurityError, match="uqcit_manifest.json: missing.*verify=False"):
        load_package(path, progress=False)


@pytest.mark.parametrize("signed", [False, True])
def test_write_validation_is_copy_on_write_at_every_step(quantized, key, tmp_path, monkeypatch, signed):
    kw = {"signing_key": key} if signed else {}
    target = export_package(*quantized, tmp_path / "pkg", **kw)
    steps: list[str] = []
    monkeypatch.setattr(swap, "FAULT_HOOK", steps.append)
    write_validation(target, "perplexity", {"ppl": 0.0}, **kw)
    monkeypatch.setattr(export_module, "_discard", lambda path: None)
    now = 0.0
    for i, at in enumerate(_occurrences(steps)):
        monkeypatch.setattr(swap, "FAULT_HOOK", _kill_at(at, target))
        with pytest.raises(SimulatedKill):
            write_validation(target, "perplexity", {"ppl": float(i + 1)}, **kw)
        _whole(target, key if signed else None)
        ppl = json.loads((target / "validation" / "perplexity.json").read_text())["ppl"]
        assert ppl in (now, float(i + 1)), at
        now = ppl
    monkeypatch.setattr(swap, "FAULT_HOOK", None)
    write_validation(target, "benchmarks", {"kl": 0.5}, **kw)
    assert _leftovers(target) == [] and _whole(target, key if signed else None)


def test_staged_package_is_loaded_and_its_figures_written_before_the_one_swap(quantized, key, tmp_path):
    """run_job's way: evaluate the staged package, write its figures, then seal and swap; signed throughout."""
    target = export_package(*quantized, tmp_path / "pkg", source_model="old", signing_key=key)
    with stage_package(*quantized, target, source_model="new", signing_key=key) as staged:
        loaded = load_package(staged.path, progress=False, verify=False)  # sealed only at commit
        assert loaded.record.source_model == "new" and _whole(target, key) == "old"
        staged.write_validation("perplexity", {"package_ppl": 12.5})
        staged.commit()
    assert _whole(target, key) == "new" and _leftovers(target) == []
    assert staged.swap_method in ("renameat2", "two-renames")  # the exchange, or the stated fallback
    assert json.loads((target / "validation" / "perplexity.json").read_text()) == {"package_ppl": 12.5}
    with pytest.raises(RuntimeError, match="already committed"):
        staged.commit()

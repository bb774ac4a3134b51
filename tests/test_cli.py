"""The command line: every bad input is one line ``uqcit: error: ...``, exit 2, before any work.

The table below runs each bad input through ``main`` in-process, with ``Session.run`` replaced
by a tripwire, so a case that reached compression fails the test instead of running it.
"""
import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from uqcit.cli import build_parser, error_line, main
from uqcit.package import METADATA_FILE, PackageError

LEVELS = {"type": "levels"}
PLAN4 = {"type": "plan", "preset": "uniform", "bits": 4, "group_size": 32}
QUANT = {"type": "quantize"}
SENS = {"type": "sensitivity", "formats": ["w2", "w4"], "group_size": 128}


def _recipe(tmp: Path, *stages) -> str:
    path = tmp / "recipe.json"
    path.write_text(json.dumps({"type": "recipe", "version": 1, "name": "bad", "stages": list(stages)}))
    return str(path)


def _file(tmp: Path, name: str, data: bytes | str) -> str:
    path = tmp / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def _eval_text(tmp: Path, text: str | bytes | None) -> str:
    corpus = str(tmp / "missing.txt") if text is None else _file(tmp, "eval.txt", text)
    return _recipe(tmp, LEVELS, PLAN4, QUANT, {"type": "eval", "corpus": corpus})


def _compress(tmp: Path, *extra, recipe="rtn-w4-g128", model="tiny-llama", out=None) -> list[str]:
    return ["compress", "--model", model, "--recipe", recipe, "--out", str(out or tmp / "pkg"),
            "--no-progress", *extra]


def _fake_metadata(tmp: Path, text: str) -> str:
    folder = tmp / "meta-pkg"
    folder.mkdir()
    (folder / METADATA_FILE).write_text(text)
    return str(folder)


# the smallest metadata PackageMetadata reads (the weights are never reached in these cases)
_METADATA = {"uqcit_version": "0", "format_version": 1, "source_model": "gone/model", "model_class": "X",
             "method": "rtn", "recipe": None, "plan": None, "average_bits_per_param": 4.0,
             "quantized_weight_count": 1, "quantized_stored_bytes": 1, "level_distribution": {},
             "modules": {}, "float_tensors": {}, "created": "2026-01-01T00:00:00+0000"}


def _other_folder(tmp: Path) -> Path:
    folder = tmp / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8 not a package")
    return folder


# (id, argv builder (tmp_path -> argv), a word the one-line message must contain)
CASES = [
    # the model
    ("unknown-model-offline", lambda t: _compress(t, model="nope-model-xyz"), "nope-model-xyz"),
    ("unknown-model-no-network", lambda t: _compress(t, model="org/nope-online"), "cannot be reached"),
    ("invalid-hub-id", lambda t: _compress(t, model="bad name!"), "valid Hugging Face id"),
    ("model-folder-missing", lambda t: _compress(t, model=str(t / "no-model") + "/"), "does not exist"),
    ("model-folder-without-config", lambda t: _compress(t, model=str(t)), "config.json"),
    ("model-is-a-file", lambda t: _compress(t, model=_file(t, "weights.bin", b"x")), "is a file"),
    ("unknown-tiny-family", lambda t: _compress(t, model="tiny-nope"), "tiny-nope"),
    # the recipe
    ("unknown-builtin-recipe", lambda t: _compress(t, recipe="nope"), "no built-in recipe"),
    ("recipe-file-missing", lambda t: _compress(t, recipe=str(t / "missing.json")), "No such file"),
    ("recipe-binary", lambda t: _compress(t, recipe=_file(t, "r.json", b"\xff\xfe\x00\x01\x80")), "UTF-8"),
    ("recipe-not-json", lambda t: _compress(t, recipe=_file(t, "r.json", "{stages")), "r.json"),
    ("recipe-a-list", lambda t: _compress(t, recipe=_file(t, "r.json", "[1, 2]")), "not a recipe"),
    ("recipe-stages-of-numbers", lambda t: _compress(
        t, recipe=_file(t, "r.json", '{"type": "recipe", "name": "x", "stages": [1]}')), "not a recipe"),
    ("bits-7", lambda t: _compress(t, recipe=_recipe(t, LEVELS, dict(PLAN4, bits=7), QUANT)), "bits"),
    ("group-size-0", lambda t: _compress(t, recipe=_recipe(t, LEVELS, dict(PLAN4, group_size=0), QUANT)),
     "group_size"),
    ("bad-format-string", lambda t: _compress(t, recipe=_recipe(t, LEVELS, dict(SENS, formats=["w4-gx"]),
                                                              {"type": "allocate"}, QUANT)), "w4-gx"),
    ("tau-5", lambda t: _compress(t, recipe=_recipe(t, LEVELS, {"type": "prune", "tau": 5})), "tau"),
    ("target-bpw-negative", lambda t: _compress(t, recipe=_recipe(
        t, LEVELS, SENS, {"type": "allocate", "target_bpw": -1}, QUANT)), "target_bpw"),
    ("target-bpw-1000", lambda t: _compress(t, recipe=_recipe(
        t, LEVELS, SENS, {"type": "allocate", "target_bpw": 1000}, QUANT)), "above 16"),
    ("target-bpw-above-formats", lambda t: _compress(t, recipe=_recipe(
        t, LEVELS, SENS, {"type": "allocate", "target_bpw": 7}, QUANT)), "4.250"),
    ("target-bpw-below-formats", lambda t: _compress(t, recipe=_recipe(
        t, LEVELS, SENS, {"type": "allocate", "target_bpw": 1}, QUANT)), "below"),
    ("allocate-without-sensitivity", lambda t: _compress(t, recipe=_recipe(
        t, LEVELS, {"type": "allocate"}, QUANT)), "sensitivity"),
    ("allocate-unmeasured-format", lambda t: _compress(t, recipe=_recipe(
        t, LEVELS, SENS, {"type": "allocate", "target_bpw": 3, "formats": ["w8-g128"]}, QUANT)), "not measured"),
    ("recipe-without-compression", lambda t: _compress(t, recipe=_recipe(t, LEVELS, PLAN4)), "nothing to export"),
    ("unknown-stage-type", lambda t: _compress(t, recipe=_recipe(t, LEVELS, {"type": "magic"})),
     "unknown stage type"),
    ("unknown-stage-key", lambda t: _compress(t, recipe=_recipe(t, LEVELS, dict(PLAN4, colour=1), QUANT)),
     "colour"),
    # the evaluation text
    ("eval-text-empty", lambda t: _compress(t, recipe=_eval_text(t, "")), "empty"),
    ("eval-text-too-short", lambda t: _compress(t, recipe=_eval_text(t, "hello world")), "tokens"),
    ("eval-text-missing", lambda t: _compress(t, recipe=_eval_text(t, None)), "does not exist"),
    ("eval-text-not-utf8", lambda t: _compress(t, recipe=_eval_text(t, b"caf\xe9 " * 9000)), "utf-8"),
    # the other options
    ("quick-0", lambda t: _compress(t, "--quick", "0"), "--quick"),
    ("quick-negative", lambda t: _compress(t, "--quick", "-3"), "--quick"),
    ("quick-not-a-number", lambda t: _compress(t, "--quick", "two"), "--quick"),
    ("out-missing", lambda t: ["compress", "--model", "tiny-llama"], "--out"),
    ("out-is-a-file", lambda t: _compress(t, out=_file(t, "notes.txt", "keep me")), "is a file"),
    ("out-is-another-folder", lambda t: _compress(t, out=_other_folder(t)), "not a UQCIT package"),
    ("out-below-a-file", lambda t: _compress(t, out=Path(_file(t, "notes.txt", "keep me")) / "pkg"),
     "not a folder"),
    ("json-is-a-folder", lambda t: _compress(t, "--json", str(t)), "--json"),
    ("json-folder-missing", lambda t: _compress(t, "--json", str(t / "no" / "r.json")), "does not exist"),
    ("encrypt-without-secret", lambda t: _compress(t, "--encrypt"), "--secret-file"),
    ("secret-twice", lambda t: _compress(t, "--encrypt", "--secret-file", "s", "--passphrase-env", "P"),
     "not both"),
    ("sign-key-missing", lambda t: _compress(t, "--sign", str(t / "no.key")), "no.key"),
    ("sign-key-garbage", lambda t: _compress(t, "--sign", _file(t, "k.key", b"\x00garbage")), "PEM"),
    ("sign-passphrase-unset", lambda t: _compress(t, "--sign", "k", "--key-passphrase-env", "UQCIT_NO_VAR"),
     "UQCIT_NO_VAR"),
    ("unknown-option", lambda t: _compress(t, "--fast"), "unrecognized"),
    # the other commands
    ("inspect-missing", lambda t: ["inspect", str(t / "nothing")], "no such package"),
    ("inspect-foreign-folder", lambda t: ["inspect", str(_other_folder(t))], METADATA_FILE),
    ("inspect-metadata-missing-fields", lambda t: ["inspect", _fake_metadata(t, '{"format_version": 1}')],
     METADATA_FILE),
    ("inspect-metadata-not-json", lambda t: ["inspect", _fake_metadata(t, "\x00\x01")], "not valid JSON"),
    ("eval-quick-0", lambda t: ["eval", str(t), "--quick", "0"], "--quick"),
    ("eval-unknown-reference", lambda t: ["eval", _fake_metadata(t, json.dumps(_METADATA)), "--reference",
                                          "nope-ref-xyz"], "nope-ref-xyz"),
    ("eval-unknown-source-model", lambda t: ["eval", _fake_metadata(t, json.dumps(_METADATA))], "gone/model"),
    ("eval-missing-package", lambda t: ["eval", str(t / "nothing"), "--reference", "none"], "no such package"),
    ("eval-bad-dtype", lambda t: ["eval", str(t), "--dtype", "int8"], "--dtype"),
    ("verify-key-missing", lambda t: ["verify", str(t), "--public-key", str(t / "no.pub")], "no.pub"),
    ("keygen-out-is-a-file", lambda t: ["keygen", "--out", _file(t, "notes.txt", "x")], "notes.txt"),
]


@pytest.fixture
def no_work(monkeypatch):
    """Offline, and any compression or package load fails the test: each case must stop before."""
    from uqcit.package import load as load_module
    from uqcit.pipeline import Session

    def tripwire(*args, **kwargs):
        raise AssertionError("the bad input was not caught before the work started")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(Session, "run", tripwire)
    monkeypatch.setattr(load_module, "load_package", tripwire)
    monkeypatch.setattr("uqcit.package.load_package", tripwire)


@pytest.mark.parametrize("case_id, argv, word", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case_id, argv, word, tmp_path, no_work, monkeypatch, capsys):
    if case_id == "unknown-model-no-network":
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setattr("uqcit.inputs.models._hub_refusal", lambda name: "the hub cannot be reached (no route)")
    argv = argv(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("uqcit: error: "), err
    assert word.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in err
    # no package left anywhere, every file as it was
    assert not [p for p in tmp_path.rglob(METADATA_FILE) if p.parent.name != "meta-pkg"]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_the_table_is_large_enough():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


def test_an_unknown_model_fails_fast_without_the_hub(monkeypatch):
    """With the hub unreachable the check makes one request, not the client's retries."""
    import time

    from uqcit.inputs.models import ModelNotFoundError, check_model_name

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # read once, at its import
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="cannot be reached"):
        check_model_name("org/surely-not-cached-xyz")
    assert time.perf_counter() - t0 < 5


# ------------------------------------------------------------------- errors met during the work

@pytest.mark.parametrize("exc, word", [
    (OSError(errno.ENOSPC, "No space left on device", "/pkg/layers/layer_000/weights.safetensors"),
     "weights.safetensors"),
    (OSError(errno.ENOSPC, "No space left on device"), "while writing"),
    (PackageError("/pkg/uqcit_metadata.json: key 'modules' must be object\nsecond line"), "modules"),
    (PermissionError(errno.EACCES, "Permission denied", "/pkg/x.json"), "x.json"),
])
def test_errors_during_the_job_are_one_line(exc, word, tmp_path, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr("uqcit.pipeline.run_job", fail)
    assert main(_compress(tmp_path)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and word in err and err.startswith("uqcit: error: ")


def test_a_full_disk_inside_safetensors_names_the_package(tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    def fail(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr("uqcit.pipeline.run_job", fail)
    assert main(_compress(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tmp_path / "pkg") in err and "No space left" in err


def test_error_line_folds_lines():
    assert error_line(ValueError("a\n  b\n")) == "a b"


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a real bug")

    monkeypatch.setattr("uqcit.pipeline.run_job", bug)
    with pytest.raises(ZeroDivisionError):
        main(_compress(tmp_path))


# --------------------------------------------------------------- no package left by a failed run

@pytest.mark.parametrize("state", ["missing", "empty"])
def test_a_run_failing_after_export_leaves_no_package(state, tmp_path, monkeypatch, capsys):
    from uqcit.pipeline import JobReport

    out = tmp_path / "pkg"
    if state == "empty":
        out.mkdir()
    seen = []

    def fail(report):  # the job's last step: the package is written by now
        seen.append((out / METADATA_FILE).is_file())
        raise PackageError("report failed (injected)")

    monkeypatch.setattr(JobReport, "format_table", fail)
    assert main(_compress(tmp_path, "--quick", "1", out=out)) == 2
    assert seen == [True], "the injected failure must come after the export"
    assert "injected" in capsys.readouterr().err
    assert (out.is_dir() and not any(out.iterdir())) if state == "empty" else not out.exists()
    assert not [p for p in tmp_path.glob(".pkg*") if p.is_dir()]  # no temporary folder either


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_a_run_failing_while_evaluating_leaves_no_package(state, tmp_path, monkeypatch, capsys):
    """The package is evaluated before it is swapped in at --out: a failure there leaves --out as it was."""
    out = tmp_path / "pkg"
    if state == "empty":
        out.mkdir()

    def fail(*args, **kwargs):
        raise PackageError("evaluation failed (injected)")

    monkeypatch.setattr("uqcit.pipeline.evaluate_many", fail)
    assert main(_compress(tmp_path, "--quick", "1", out=out)) == 2
    assert "injected" in capsys.readouterr().err
    assert (out.is_dir() and not any(out.iterdir())) if state == "empty" else not out.exists()
    assert not [p for p in tmp_path.glob(".pkg*") if p.is_dir()]


def test_a_failed_run_never_removes_the_package_that_was_there(tmp_path, monkeypatch, capsys):
    out = tmp_path / "pkg"
    out.mkdir()
    (out / METADATA_FILE).write_text('{"format_version": 1}')  # stands for an earlier package

    def fail(*args, **kwargs):
        raise PackageError("calibration failed (injected)")

    from uqcit.pipeline import Session

    monkeypatch.setattr(Session, "run", fail)
    assert main(_compress(tmp_path, "--quick", "1", out=out)) == 2
    assert (out / METADATA_FILE).read_text() == '{"format_version": 1}'


# ------------------------------------------------------------------------------ the good paths

@pytest.mark.parametrize("cmd", ["compress", "eval", "inspect", "fetch-data", "recipes", "report", "export"])
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: uqcit " + cmd in capsys.readouterr().out


def test_recipes_lists_builtins(capsys):
    assert main(["recipes"]) == 0
    assert "uqcit-default" in capsys.readouterr().out


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "uqcit.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "compress" in out.stdout
    assert build_parser().prog == "uqcit"


def test_verify_without_a_key_checks_every_file_against_the_manifest(tmp_path, capsys):
    from uqcit.inputs.tiny import tiny_model
    from uqcit.package import export_package
    from uqcit.stages.levels import analyze_levels
    from uqcit.stages.plan import PlanConfig, build_plan
    from uqcit.stages.quantize import quantize_model

    model, tok = tiny_model("llama")
    levels = analyze_levels(model)
    q = quantize_model(model, levels, build_plan(levels, PlanConfig(preset="uniform", bits=4)), progress=False)
    pkg = export_package(q, tok, tmp_path / "pkg")
    assert main(["verify", str(pkg)]) == 0
    assert "match the SHA-256 manifest" in capsys.readouterr().out
    weights = pkg / "layers" / "layer_001" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of weight data
    weights.write_bytes(bytes(data))
    assert main(["verify", str(pkg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "layer_001/weights.safetensors" in err[0]


def test_eval_computes_in_the_dtype_asked(tmp_path, capsys):
    """``--dtype bfloat16`` loads the package in bf16: the record and the printed line say so (read
    off the loaded model), and the perplexity is not the float32 one (the default, as stored)."""
    from uqcit.package import export_package
    from uqcit.package.examples import tiny_quantized

    pkg = export_package(*tiny_quantized(), tmp_path / "pkg")
    records = {}
    for dtype, extra in (("float32", []), ("bfloat16", ["--dtype", "bfloat16"])):
        out = tmp_path / f"{dtype}.json"
        argv = ["eval", str(pkg), "--reference", "none", "--quick", "1", "--json", str(out), "--no-progress"]
        assert main(argv + extra) == 0
        assert capsys.readouterr().out.strip().endswith(f", computed in {dtype}")
        records[dtype] = json.loads(out.read_text())
        assert records[dtype]["dtype"] == dtype and records[dtype]["package"]["windows"] == 1
    assert records["bfloat16"]["package"]["ppl"] != records["float32"]["package"]["ppl"]

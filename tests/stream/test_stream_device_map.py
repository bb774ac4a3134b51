"""A streamed job with a device map (``compress_streamed(device_map=...)``, ``compress --stream --device-map``).

Without a GPU the map is exercised with CPU stand-ins: ``"cpu"`` and ``"cpu:0"`` are the same
memory but different ``torch.device``s, so a map alternating them moves the activations and the
blocks' arguments at every block, as a map over GPUs does.
"""
import json

import pytest
import torch

from uqcit.cli import EXIT_USAGE, main
from uqcit.core.keys import ConfigError
from uqcit.recipe import builtin_recipe
from uqcit.stages.quantize import QuantizeConfig
from uqcit.stream import compress_streamed
from uqcit.stream.job import _Job

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
# Sequential GPTQ, activation importance, untied head (mistral): both streams, Hessians, the head's statistics.
GPTQ = QuantizeConfig(method="gptq", sequential=True, importance="activation", calib_samples=6, calib_seq_len=32)
ALTERNATING = {0: "cpu", 1: "cpu:0", "model.layers.2": "cpu", 3: "cpu:0"}  # the tiny models have 4 blocks


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from uqcit.inputs.tiny import tiny_model

    folder = tmp_path_factory.mktemp("llama")
    model, tok = tiny_model("llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def gptq_recipe():
    return builtin_recipe("rtn-w3-g128").with_stage(GPTQ)


def test_a_map_of_cpu_entries_writes_the_single_device_package_file_for_file(tmp_path, save_tiny, package_files,
                                                                            monkeypatch):
    src = save_tiny("mistral", tmp_path / "src")
    moves = []
    move = _Job._move_streams

    def spy(self, device):
        move(self, device)
        moves.append((str(self.at), {str(h.device) for hs in self.streams.values() for h in hs}))
    monkeypatch.setattr(_Job, "_move_streams", spy)
    single = compress_streamed(src, gptq_recipe(), tmp_path / "single", progress=False)
    assert single.device == "cpu" and moves == [("cpu", {"cpu"})] * 4
    moves.clear()
    mapped = compress_streamed(src, gptq_recipe(), tmp_path / "mapped", progress=False, device_map=ALTERNATING)
    assert mapped.device == "0=cpu,1=cpu:0,2=cpu,3=cpu:0"
    assert [at for at, _ in moves] == ["cpu", "cpu:0", "cpu", "cpu:0"]  # each block's device, streams moved there
    expected, got = package_files(tmp_path / "single"), package_files(tmp_path / "mapped")
    assert sorted(got) == sorted(expected) and [name for name in expected if got[name] != expected[name]] == []


def test_a_job_resumed_with_another_map_goes_on_and_records_where_each_block_ran(tmp_path, save_tiny,
                                                                                 package_files):
    src = save_tiny("mistral", tmp_path / "src")
    whole = compress_streamed(src, gptq_recipe(), tmp_path / "whole", progress=False)
    run = tmp_path / "run"

    def stop(block):
        if block == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        compress_streamed(src, gptq_recipe(), tmp_path / "pkg", run_dir=run, progress=False, on_block=stop,
                          device_map={b: "cpu:0" for b in range(4)})
    assert json.loads((run / "run.json").read_text())["devices"] == ["cpu:0", "cpu:0"]
    resumed = compress_streamed(src, gptq_recipe(), tmp_path / "pkg", run_dir=run, progress=False, device="cpu")
    assert resumed.resumed_at == 2 and resumed.device == "0-1=cpu:0,2-3=cpu" and whole.device == "cpu"
    assert package_files(tmp_path / "pkg") == package_files(tmp_path / "whole")


@pytest.mark.parametrize("device_map, match", [
    ({0: "cpu", 1: "cpu", 2: "cpu"}, r"device_map: block\(s\) 3 have no device; give every block 0 to 3 one device"),
    ({0: "cpu", 3: "cpu"}, r"block\(s\) 1-2 have no device"),
    ({0: "cpu", 1: "cpu", 2: "cpu", 3: "cpu", "model.layers.3": "cpu"},
     r"device_map: block 3 is given twice \(3 and 'model.layers.3'\)"),
    ({**{b: "cpu" for b in range(4)}, "lm_head": "cpu", 4: "cpu", "layers.0": "cpu"},
     r"device_map: key\(s\) 'lm_head', 4, 'layers.0' name no block; keys are block indices 0 to 3 or prefixes "
     r"'model.layers.0' to 'model.layers.3'"),
])
def test_a_map_that_does_not_place_each_block_once_is_refused_before_any_work(tmp_path, llama, device_map, match):
    with pytest.raises(ConfigError, match=match):
        compress_streamed(llama, gptq_recipe(), tmp_path / "pkg", progress=False, device_map=device_map)
    assert list(tmp_path.iterdir()) == []  # no package, no run folder


@pytest.mark.parametrize("kwargs, match", [
    (dict(device_map={0: "cpu", 2: "gpu"}), r"device_map\[2\]: device 'gpu': torch knows no such device"),
    (dict(device_map={0: "cpu", 1: "cuda:7"}), r"device_map\[1\]: device 'cuda:7': "),
    (dict(device_map="auto"), r"device_map 'auto': give 'balanced' or a dict"),
    (dict(device_map=["cpu"]), r"device_map: expected 'balanced' or a dict from block to device, got list"),
    (dict(device="cpu", device_map={0: "cpu"}), r"device 'cpu' and a device_map exclude each other"),
    pytest.param(dict(device_map="balanced"), r"device_map 'balanced' spreads the blocks over the CUDA GPUs, and "
                 r"torch sees none here; use device='cpu'", marks=pytest.mark.skipif(GPUS > 0, reason="a GPU is here")),
])
def test_a_bad_device_in_a_map_fails_before_the_folder_is_read(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):  # the folder is not even read: it does not exist
        compress_streamed(tmp_path / "no-model", builtin_recipe("rtn-w4-g128"), tmp_path / "pkg", progress=False,
                          **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_takes_a_device_map_with_stream_only_and_not_with_device(tmp_path, llama, capsys):
    out = tmp_path / "pkg"
    rc = main(["compress", "--model", str(llama), "--recipe", "rtn-w4-g128", "--out", str(out), "--stream",
               "--device-map", "0-1=cpu, 2-3=cpu:0", "--json", str(tmp_path / "r.json"), "--no-progress"])
    assert rc == 0 and json.loads((tmp_path / "r.json").read_text())["device"] == "0-1=cpu,2-3=cpu:0"
    assert "0-1=cpu,2-3=cpu:0" in capsys.readouterr().out
    for argv, message in [
        (["--stream", "--device-map", "0-3cpu"], "device map '0-3cpu': entry '0-3cpu' is not BLOCKS=DEVICE"),
        (["--stream", "--device-map", "0-2=cpu"], "device_map: block(s) 3 have no device"),
        (["--device-map", "0-3=cpu"], "--device-map 0-3=cpu is for --stream jobs"),
    ] + ([] if GPUS else [(["--stream", "--device-map", "balanced"], "torch sees none here; use device='cpu'")]):
        rc = main(["compress", "--model", str(llama), "--out", str(tmp_path / "other"), *argv, "--no-progress"])
        err = capsys.readouterr().err
        assert rc == EXIT_USAGE and err.count("\n") == 1 and message in err, err
    with pytest.raises(SystemExit) as exit_:
        main(["compress", "--model", str(llama), "--out", str(tmp_path / "other"), "--stream", "--device", "cpu",
              "--device-map", "balanced"])
    assert exit_.value.code == EXIT_USAGE
    assert "argument --device-map: not allowed with argument --device" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def assert_gpu_matches_cpu(tmp_path, src, package_files, device_map) -> str:
    """RTN: the CPU's codes bit for bit (round to nearest is elementwise). Sequential GPTQ: float sums run
    in another order on a GPU, so near-tie roundings may differ and GPTQ carries each one along its row;
    the packages' logits must differ by less than a quarter of the quantization error itself (the CPU
    package's against the float model's): a misplaced mask or stream gives logits as far off as that
    error or more. Returns the report's placement."""
    from transformers import AutoModelForCausalLM

    from uqcit.package import load_package

    rtn = builtin_recipe("rtn-w4-g128")
    compress_streamed(src, rtn, tmp_path / "rtn-cpu", progress=False)
    report = compress_streamed(src, rtn, tmp_path / "rtn-gpu", progress=False, device_map=device_map)
    cpu, gpu = package_files(tmp_path / "rtn-cpu"), package_files(tmp_path / "rtn-gpu")
    assert sorted(gpu) == sorted(cpu)
    weights = [name for name in cpu if name.endswith("weights.safetensors")]
    assert len(weights) > report.blocks and [name for name in weights if gpu[name] != cpu[name]] == []
    compress_streamed(src, gptq_recipe(), tmp_path / "gptq-cpu", progress=False)
    compress_streamed(src, gptq_recipe(), tmp_path / "gptq-gpu", progress=False, device_map=device_map)
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(src).eval()(ids).logits
        on_cpu = load_package(tmp_path / "gptq-cpu", progress=False).model(ids).logits
        on_gpu = load_package(tmp_path / "gptq-gpu", progress=False).model(ids).logits
    assert torch.isfinite(on_gpu).all()
    assert (on_gpu - on_cpu).norm() < 0.25 * (on_cpu - ref).norm()
    return report.device


@pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")
def test_a_map_of_every_block_on_one_gpu_matches_the_cpu(tmp_path, save_tiny, package_files):
    src = save_tiny("mistral", tmp_path / "src")
    assert assert_gpu_matches_cpu(tmp_path, src, package_files, {b: "cuda:0" for b in range(4)}) == "cuda:0"


@pytest.mark.skipif(GPUS < 2, reason="needs two CUDA GPUs")
def test_a_balanced_map_over_two_gpus_matches_the_cpu(tmp_path, save_tiny, package_files):
    from uqcit.stream.devices import parse_device_map

    src = save_tiny("mistral", tmp_path / "src")
    placement = assert_gpu_matches_cpu(tmp_path, src, package_files, "balanced")
    if GPUS == 2:
        assert placement == "0-1=cuda:0,2-3=cuda:1"
    gpus = [int(d.split(":")[1]) for d in parse_device_map(placement).values()]  # blocks 0 to 3 in order
    runs = [gpus.count(g) for g in sorted(set(gpus))]
    assert gpus == sorted(gpus) and gpus[0] == 0 and len(runs) == min(GPUS, 4) and max(runs) - min(runs) <= 1

"""A streamed job on a device (``compress_streamed(device=...)``, ``compress --stream --device``)."""
import pytest
import torch

from uqcit.cli import EXIT_USAGE, main
from uqcit.core.keys import ConfigError
from uqcit.recipe import builtin_recipe
from uqcit.stages.quantize import QuantizeConfig
from uqcit.stream import compress_streamed

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device, match", [
    ("gpu", r"device 'gpu': torch knows no such device; use 'cpu', 'cuda' or 'cuda:N'"),
    pytest.param("cuda", r"device 'cuda': torch sees no CUDA GPU here", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="a CUDA GPU is here")),
])
def test_a_device_this_machine_lacks_fails_before_any_work(tmp_path, device, match):
    with pytest.raises(ConfigError, match=match):  # the folder is not even read: it does not exist
        compress_streamed(tmp_path / "no-model", builtin_recipe("rtn-w4-g128"), tmp_path / "pkg", progress=False,
                          device=device)
    assert list(tmp_path.iterdir()) == []  # no package, no run folder


def test_the_command_line_takes_device_only_with_stream(tmp_path, capsys):
    rc = main(["compress", "--model", "tiny-llama", "--out", str(tmp_path / "pkg"), "--device", "cuda",
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE and err.count("\n") == 1
    assert "--device cuda is for --stream jobs" in err
    rc = main(["compress", "--model", str(tmp_path), "--out", str(tmp_path / "pkg"), "--stream", "--device", "gpu",
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE and err.startswith("uqcit: error: device 'gpu'") and err.count("\n") == 1
    assert not (tmp_path / "pkg").exists()


@needs_cuda
def test_a_streamed_job_on_cuda_writes_the_cpu_codes_and_a_package_that_runs(tmp_path, save_tiny, package_files):
    src = save_tiny("mistral", tmp_path / "src")
    # Round to nearest is elementwise: the GPU stores the CPU's codes bit for bit (tests/tensor/test_quant.py).
    rtn = builtin_recipe("rtn-w4-g128")
    compress_streamed(src, rtn, tmp_path / "cpu", progress=False)
    report = compress_streamed(src, rtn, tmp_path / "gpu", progress=False, device="cuda")
    cpu, gpu = package_files(tmp_path / "cpu"), package_files(tmp_path / "gpu")
    assert report.device == "cuda" and sorted(gpu) == sorted(cpu)
    weights = [name for name in cpu if name.endswith("weights.safetensors")]
    assert len(weights) > report.blocks and [name for name in weights if gpu[name] != cpu[name]] == []
    # Sequential GPTQ with activation importance and an untied head: Hessians, both streams and the
    # head's statistics on the GPU. Float sums run in another order there, so near-tie roundings may
    # differ from the CPU's: the check is that the package is complete and runs.
    gptq = builtin_recipe("rtn-w3-g128").with_stage(QuantizeConfig(
        method="gptq", sequential=True, importance="activation", calib_samples=6, calib_seq_len=32))
    compress_streamed(src, gptq, tmp_path / "gptq", progress=False, device="cuda")
    from uqcit.package import load_package

    pkg = load_package(tmp_path / "gptq", progress=False)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.isfinite(pkg.model(ids).logits).all()
    assert pkg.model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 8)

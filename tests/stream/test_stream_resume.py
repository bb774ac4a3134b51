"""A streamed job stopped after block k resumes at block k + 1 and writes the same package."""
import pytest

from uqcit.core.keys import ConfigError
from uqcit.recipe import builtin_recipe
from uqcit.stages.quantize import QuantizeConfig
from uqcit.stream import compress_streamed


class Stop(Exception):
    pass


def stop_after(k: int):
    def hook(block: int) -> None:
        if block == k:
            raise Stop(block)
    return hook


@pytest.mark.parametrize("quantize", [
    # Sequential GPTQ with an untied head: both activation streams (quantized and float) resume.
    QuantizeConfig(method="gptq", sequential=True, calib_samples=6, calib_seq_len=32),
    # Learned rounding: both streams and the random generator's state resume.
    QuantizeConfig(method="signround", iters=5, micro_batch=2, calib_samples=5, calib_seq_len=32),
])
def test_an_interrupted_job_resumes_at_the_next_block_with_the_same_package(tmp_path, save_tiny, package_files,
                                                                           quantize):
    src = save_tiny("mistral", tmp_path / "src")
    recipe = builtin_recipe("rtn-w3-g128").with_stage(quantize)
    whole = compress_streamed(src, recipe, tmp_path / "whole", progress=False)
    run = tmp_path / "run"
    with pytest.raises(Stop):
        compress_streamed(src, recipe, tmp_path / "pkg", run_dir=run, progress=False, on_block=stop_after(1))
    assert not (tmp_path / "pkg").exists()
    assert sorted(p.name for p in (run / "part" / "layers").iterdir()) == ["layer_000", "layer_001"]
    seen = []
    resumed = compress_streamed(src, recipe, tmp_path / "pkg", run_dir=run, progress=False, on_block=seen.append)
    assert resumed.resumed_at == 2 and seen == [2, 3] and whole.resumed_at == 0
    assert package_files(tmp_path / "pkg") == package_files(tmp_path / "whole")
    assert not run.exists()


def test_a_run_folder_of_another_job_is_refused(tmp_path, save_tiny):
    src = save_tiny("llama", tmp_path / "src")
    run = tmp_path / "run"
    with pytest.raises(Stop):
        compress_streamed(src, builtin_recipe("rtn-w4-g128"), tmp_path / "pkg", run_dir=run, progress=False,
                          on_block=stop_after(0))
    with pytest.raises(ConfigError, match="checkpoint of another job"):
        compress_streamed(src, builtin_recipe("rtn-w3-g128"), tmp_path / "pkg", run_dir=run, progress=False)

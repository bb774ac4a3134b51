"""``uqcit compress --stream``: the options and the command, kept here so ``uqcit.cli`` stays thin.

>>> import argparse
>>> p = argparse.ArgumentParser()
>>> add_arguments(p)
>>> p.parse_args(["--stream", "--run-dir", "r"]).run_dir
'r'
>>> p.parse_args(["--stream", "--device", "cuda:1"]).device
'cuda:1'
>>> p.parse_args(["--stream", "--device-map", "0-11=cuda:0,12-29=cuda:1"]).device_map
'0-11=cuda:0,12-29=cuda:1'
"""
from __future__ import annotations

from pathlib import Path

from uqcit.core.io import atomic_write
from uqcit.core.keys import ConfigError


def add_arguments(parser) -> None:
    """Add ``--stream``, ``--run-dir`` and ``--device`` or ``--device-map`` to the ``compress`` parser."""
    parser.add_argument("--stream", action="store_true", help="quantize one decoder block at a time from the "
                        "model folder's safetensors shards, for models larger than memory (levels, plan and "
                        "rtn/gptq quantize stages; writes the package without evaluating it)")
    parser.add_argument("--run-dir", metavar="DIR", help="with --stream: the block checkpoints, so a stopped job "
                        "resumes at the next block (default: .NAME.stream beside --out; removed at the end)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--device", metavar="DEV", help="with --stream: where the calibration statistics and "
                       "GPTQ run, 'cpu' (default), 'cuda' or 'cuda:N'; each block moves there and back")
    where.add_argument("--device-map", metavar="MAP", help="with --stream: each block on its own device, "
                       "'balanced' (equal runs of blocks over the visible GPUs) or BLOCKS=DEVICE entries such "
                       "as 0-11=cuda:0,12-29=cuda:1 (ranges inclusive, every block once); the embedding and "
                       "head run on block 0's device")


def check_device_option(args) -> None:
    """``--device`` and ``--device-map`` belong to ``--stream``: refuse them on an in-memory or server job,
    which would ignore them."""
    for flag, value in (("--device", getattr(args, "device", None)),
                        ("--device-map", getattr(args, "device_map", None))):
        if value is not None and not args.stream:
            raise ConfigError(f"{flag} {value} is for --stream jobs (the in-memory job computes on the CPU); "
                              f"add --stream or drop {flag}")


def run_streamed(args, recipe) -> int:
    """``compress --stream``: ``compress_streamed`` on ``args.model``'s folder; prints its table."""
    from uqcit.stream.devices import parse_device_map
    from uqcit.stream.job import compress_streamed  # torch: only when the command runs

    refused = [flag for flag, on in (("--quick", args.quick), ("--sign", args.sign), ("--encrypt", args.encrypt),
                                     ("--encode", args.encode), ("--server", args.server)) if on]
    if refused:
        raise ConfigError(f"--stream writes the package without loading the whole model, so {', '.join(refused)} "
                          "cannot apply; drop them, or run without --stream")
    report = compress_streamed(source_folder(args.model), recipe, args.out, run_dir=args.run_dir,
                               model_name=args.model, progress=not args.no_progress, device=args.device,
                               device_map=None if args.device_map is None else parse_device_map(args.device_map))
    table = report.format_table()
    if args.json:
        atomic_write(args.json, (report.to_json() + "\n").encode())
    print(table)
    return 0


def source_folder(name: str) -> Path:
    """The local safetensors folder of a model name: a folder itself, or the converted SmolLM2 cache.

    >>> source_folder("/nonexistent/model")
    Traceback (most recent call last):
    ...
    uqcit.inputs.models.ModelNotFoundError: --stream reads a local model folder; '/nonexistent/model' is not one (a folder with config.json and safetensors shards, or smollm2-135m)
    """
    from uqcit.inputs.models import SMOLLM2, ModelNotFoundError, load_model, smollm2_cache_dir

    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder
    if name == SMOLLM2:
        if not (smollm2_cache_dir() / "config.json").is_file():
            load_model(name, progress=False)  # converts the GGUF into the safetensors cache once (135 M)
        return smollm2_cache_dir()
    raise ModelNotFoundError(f"--stream reads a local model folder; {name!r} is not one (a folder with "
                             "config.json and safetensors shards, or smollm2-135m)")

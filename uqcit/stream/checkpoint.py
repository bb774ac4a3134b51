"""The run folder of a streamed job: one checkpoint per finished block, so a stopped job resumes.

Layout (``<run>/``)::

    run.json                          identity of the job, next block, records and index so far
    streams-NNNNN.safetensors         calibration activations entering block NNNNN (per micro-batch)
    part/layers/layer_NNN/...         the package's layer folders of the finished blocks

A block is finished when ``run.json`` says so: its layer folder is written first, then the
activations it produced, then ``run.json`` (each file atomically, ``uqcit.core.io``), so a job
killed at any point leaves a checkpoint that names only complete files. ``open_run`` refuses a
run folder of another job (another source, recipe or shard sizes) rather than mixing them.

Where each block computed (``devices``, one name per finished block) is recorded, not part of
the identity: a job resumed with another device or device map goes on. The checkpoint holds the
activations on the CPU whatever placed them, and on the CPU a block's result does not depend on
the map at all (``tests/stream/test_stream_device_map.py``: the same package file for file);
between the CPU and a GPU, or GPUs, only the order of float sums differs, as it does for a
single-device job resumed elsewhere. Refusing would leave a job whose GPU is gone unable to
finish; the record keeps the report truthful about which block ran where.

>>> import tempfile
>>> from pathlib import Path
>>> run = open_run(Path(tempfile.mkdtemp()) / "run", {"source": "m"})
>>> run.save(1, {"q": [torch.zeros(2, 3)]})
>>> open_run(run.path, {"source": "m"}).load_streams()["q"][0].shape
torch.Size([2, 3])
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch

from uqcit.core.io import to_json, write_json
from uqcit.core.keys import ConfigError
from uqcit.core.names import layer_dir
from uqcit.package.canonical import save_safetensors

STATE_FILE = "run.json"
VERSION = 1


@dataclasses.dataclass
class RunState:
    """What ``run.json`` holds: the job's identity and everything the finished blocks produced."""

    identity: dict[str, Any]  # source folder, recipe, shard sizes: a resumed job must match it
    next_block: int = 0
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # ModuleQuant fields per module
    modules: dict[str, Any] = dataclasses.field(default_factory=dict)  # the metadata's module index so far
    float_tensors: dict[str, Any] = dataclasses.field(default_factory=dict)
    streams: str | None = None  # the activations file entering ``next_block``
    devices: list[str] = dataclasses.field(default_factory=list)  # per finished block: where it computed

    def add_block(self, records: Iterable[Any], modules: dict[str, Any], float_tensors: dict[str, Any],
                  block: int, device: str) -> None:
        self.records += [dataclasses.asdict(r) for r in records]
        # a checkpoint written before devices were recorded names none for its blocks
        self.devices += ["unrecorded"] * (block - len(self.devices)) + [device]
        self.modules.update(modules)
        self.float_tensors.update(float_tensors)


class Run:
    """A run folder and its state (``open_run`` makes one)."""

    def __init__(self, path: Path, state: RunState):
        self.path, self.state = path, state
        self.root = path / "part"  # the layer folders live in root/layers, as in a package

    def save(self, next_block: int, streams: dict[str, list[torch.Tensor]]) -> None:
        """Checkpoint: the activations entering ``next_block`` (if any), then the state."""
        old = self.state.streams
        name = None
        if streams:
            name = f"streams-{next_block:05d}.safetensors"
            save_safetensors({f"{k}.{i}": t.contiguous() for k, ts in streams.items() for i, t in enumerate(ts)},
                             self.path / name)
        self.state.next_block, self.state.streams = next_block, name
        write_json(self.path / STATE_FILE, {"version": VERSION, **dataclasses.asdict(self.state)})
        if old is not None and old != name:
            (self.path / old).unlink(missing_ok=True)

    def load_streams(self) -> dict[str, list[torch.Tensor]] | None:
        """The checkpointed activations, or None on a fresh run."""
        if self.state.streams is None:
            return None
        from safetensors.torch import load_file

        flat = load_file(self.path / self.state.streams)
        out: dict[str, list[torch.Tensor]] = {}
        for key in sorted(flat, key=lambda k: (k.split(".")[0], int(k.split(".")[1]))):
            out.setdefault(key.split(".")[0], []).append(flat[key])
        return out

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def open_run(path: Path, identity: dict[str, Any]) -> Run:
    """The run folder at ``path``: resumed when it holds a checkpoint of the same job, else new.

    Layer folders of blocks the checkpoint does not count as finished are removed (a job killed
    while writing one)."""
    identity = json.loads(to_json(identity))  # the form run.json stores it in
    state_file = path / STATE_FILE
    if state_file.is_file():
        data = json.loads(state_file.read_text())
        if data.pop("version", None) != VERSION or data.get("identity") != identity:
            raise ConfigError(f"run folder {str(path)!r} holds a checkpoint of another job (source, recipe or "
                              "checkpoint files differ); remove it or choose another run folder")
        state = RunState(**data)
    else:
        state = RunState(identity)
        path.mkdir(parents=True, exist_ok=True)
    run = Run(path, state)
    layers = run.root / "layers"
    finished = {layer_dir(b) for b in range(state.next_block)}
    for folder in sorted(layers.iterdir()) if layers.is_dir() else ():
        if folder.name not in finished:
            shutil.rmtree(folder)
    return run

"""Checkpoints of self-retraining: a safetensors file written atomically after every window.

It holds the self-generated token ids, the kept trainable tensors, the optimizer state and the
window log (JSON header), stamped with a fingerprint of the settings and the model, so a run
resumes only from its own checkpoint. The loop that writes and resumes is ``uqcit.stages.retrain``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uqcit.core.config import StageConfig
from uqcit.core.io import atomic_write_with
from uqcit.inputs.selftext import SelfText

FILE_KIND = "uqcit-retrain-checkpoint"
FILE_VERSION = 1


def fingerprint(config: StageConfig, original: nn.Module) -> str:
    """What a checkpoint must match to resume: every setting but the path, the model's name and size."""
    settings = {k: v for k, v in config.to_dict().items() if k != "checkpoint"}
    name = getattr(getattr(original, "config", None), "name_or_path", "") or type(original).__name__
    ident = [name, sum(p.numel() for p in original.parameters())]
    return hashlib.sha256(json.dumps([settings, ident], sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(config: StageConfig, original: nn.Module, data: SelfText, params: dict[str, nn.Parameter],
                    optimizer: torch.optim.Optimizer, log: list, best: float, s0: float,
                    times: dict[str, float]) -> Path:
    """Write the checkpoint at ``config.checkpoint`` atomically: text, trainable tensors, optimizer, log."""
    from safetensors.torch import save_file

    path = Path(config.checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"data.ids": data.ids.contiguous(), "data.prompt_lengths": data.prompt_lengths,
               "data.prompt_index": data.prompt_index}
    tensors.update({f"param.{n}": p.detach().contiguous() for n, p in params.items()})
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for key, value in st.items():
            tensors[f"opt.{idx}.{key}"] = torch.as_tensor(value).contiguous()
    header = {"fingerprint": fingerprint(config, original), "config": config.to_dict(),
              "param_groups": opt["param_groups"], "log": [dataclasses.asdict(r) for r in log],
              "best": best, "s0": s0, "seconds": times, "prompts": list(data.prompts),
              "generate_seconds": data.seconds}
    metadata = {"kind": FILE_KIND, "version": str(FILE_VERSION), "header": json.dumps(header)}
    # Readers see the old checkpoint or the new one, never half of one.
    return atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_checkpoint(config: StageConfig, original: nn.Module) -> dict[str, Any] | None:
    """The state in ``config.checkpoint`` (None when there is no file); raises if it is another run's.

    ``"log"`` holds the window records as dicts.
    """
    from safetensors import safe_open

    path = Path(config.checkpoint)
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("kind") != FILE_KIND or meta.get("version") != str(FILE_VERSION):
            raise ValueError(f"{path} is not a retrain checkpoint of version {FILE_VERSION} "
                             f"(kind {meta.get('kind')!r}, version {meta.get('version')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    head = json.loads(meta["header"])
    if head["fingerprint"] != fingerprint(config, original):
        raise ValueError(f"checkpoint {path} was written with other settings or another model; delete it "
                         "or give another checkpoint path to start afresh")
    data = SelfText(tensors["data.ids"], tensors["data.prompt_lengths"], tensors["data.prompt_index"],
                    tuple(head["prompts"]), head["generate_seconds"])
    return {"data": data, "tensors": tensors, "param_groups": head["param_groups"], "best": head["best"],
            "s0": head["s0"], "seconds": head["seconds"], "log": head["log"]}


def restore(params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Put a loaded checkpoint's trainable tensors and optimizer state back."""
    tensors = state["tensors"]
    missing = [n for n in params if f"param.{n}" not in tensors]
    if missing:
        raise ValueError(f"checkpoint lacks trainable tensors {missing[:3]}...; delete it to start afresh")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})

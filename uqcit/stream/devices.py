"""Where each block of a streamed job computes: a device map, accelerate-style.

A map is ``None`` (every block on the job's one ``device``), ``"balanced"`` (contiguous, equal
runs of blocks over every CUDA GPU torch sees), or a dict from a block, by index (``3``) or by
module prefix (``"model.layers.3"``), to a device name (``"cpu"``, ``"cuda"``, ``"cuda:N"``, or a
GPU index as accelerate writes it). The modules outside the blocks (embedding, final norm, head)
compute on block 0's device. ``check_device_map`` checks the devices before any work;
``place_blocks`` checks, once the model's blocks are known, that each is placed exactly once.

On the command line a map is ``balanced`` or ``BLOCKS=DEVICE`` entries, comma separated, where
``BLOCKS`` is a block index or an inclusive range ``A-B``; ``format_device_map`` writes a
placement back in that syntax:

>>> parse_device_map("0-1=cpu,2-3=cuda:1")
{0: 'cpu', 1: 'cpu', 2: 'cuda:1', 3: 'cuda:1'}
>>> format_device_map(["cpu", "cpu", "cuda:1", "cuda:1"])
'0-1=cpu,2-3=cuda:1'
>>> format_device_map(["cpu"] * 4)
'cpu'
>>> parse_device_map("0-3=cpu,3=cuda:0")
Traceback (most recent call last):
...
uqcit.core.keys.ConfigError: device map '0-3=cpu,3=cuda:0': block 3 is placed twice
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

import torch

from uqcit.core.keys import ConfigError
from uqcit.package.load import resolve_device

BALANCED = "balanced"
DeviceMap = Union[str, Mapping[Any, Any], None]  # None, "balanced", or {block index or prefix: device}


def parse_device_map(text: str) -> str | dict[int, str]:
    """The command line's ``--device-map`` (see the module doc): ``"balanced"``, or block index -> device
    name; ``ConfigError`` for an entry that is not ``BLOCKS=DEVICE`` or a block placed twice."""
    text = text.strip()
    if text == BALANCED:
        return BALANCED
    out: dict[int, str] = {}
    for entry in text.split(","):
        blocks, eq, device = (s.strip() for s in entry.partition("="))
        first, dash, last = (s.strip() for s in blocks.partition("-"))
        if not (eq and device and first.isdigit() and (not dash or last.isdigit())):
            raise ConfigError(f"device map {text!r}: entry {entry.strip()!r} is not BLOCKS=DEVICE; write "
                              f"'{BALANCED}' or entries such as 0-11=cuda:0,12-29=cuda:1 (ranges inclusive)")
        lo, hi = int(first), int(last) if dash else int(first)
        if hi < lo:
            raise ConfigError(f"device map {text!r}: range {blocks!r} runs backwards; write {hi}-{lo}")
        for b in range(lo, hi + 1):
            if b in out:
                raise ConfigError(f"device map {text!r}: block {b} is placed twice")
            out[b] = device
    return out


def format_device_map(devices: list[str]) -> str:
    """A placement (one device name per block) in ``--device-map``'s syntax; one name when all agree."""
    if len(set(devices)) <= 1:
        return devices[0] if devices else ""
    runs: list[list[Any]] = []  # [first block, last block, device]
    for b, d in enumerate(devices):
        if runs and runs[-1][2] == d:
            runs[-1][1] = b
        else:
            runs.append([b, b, d])
    return ",".join(f"{lo}={d}" if lo == hi else f"{lo}-{hi}={d}" for lo, hi, d in runs)


def check_device_map(device: str | torch.device | None, device_map: DeviceMap) -> torch.device | str | dict:
    """Before any work: the single device (``resolve_device``), ``"balanced"`` when a GPU is visible,
    or the map with its devices resolved (``ConfigError`` naming the entry whose device this machine
    lacks). ``device`` and ``device_map`` exclude each other."""
    if device_map is None:
        return resolve_device("cpu" if device is None else device)
    if device is not None:
        raise ConfigError(f"device {str(device)!r} and a device_map exclude each other: give one of them")
    if isinstance(device_map, str):
        if device_map != BALANCED:
            raise ConfigError(f"device_map {device_map!r}: give {BALANCED!r} or a dict from block (index or "
                              "'model.layers.N' prefix) to device")
        if _gpus() == 0:
            raise ConfigError(f"device_map {BALANCED!r} spreads the blocks over the CUDA GPUs, and torch sees "
                              "none here; use device='cpu' (--device cpu) or a map of 'cpu' entries")
        return BALANCED
    if not isinstance(device_map, Mapping):
        raise ConfigError(f"device_map: expected {BALANCED!r} or a dict from block to device, got "
                          f"{type(device_map).__name__}")
    out = {}
    for key, value in device_map.items():
        try:
            out[key] = resolve_device(value)
        except ConfigError as exc:
            raise ConfigError(f"device_map[{key!r}]: {exc}") from None
    return out


def place_blocks(spec: torch.device | str | Mapping[Any, torch.device], n_blocks: int,
                 stack_name: str) -> list[torch.device]:
    """The device of each of the ``n_blocks`` blocks (named ``stack_name.N``) under ``check_device_map``'s
    ``spec``. ``ConfigError`` for a key that names no block, a block given twice, a block left out.

    >>> place_blocks({0: "cpu", "model.layers.1": "cpu"}, 2, "model.layers")
    [device(type='cpu'), device(type='cpu')]
    >>> place_blocks({0: "cpu", "lm_head": "cpu"}, 2, "model.layers")
    Traceback (most recent call last):
    ...
    uqcit.core.keys.ConfigError: device_map: key(s) 'lm_head' name no block; keys are block indices 0 to 1 or prefixes 'model.layers.0' to 'model.layers.1' (the modules outside the blocks run on block 0's device)
    """
    if isinstance(spec, torch.device):
        return [spec] * n_blocks
    if spec == BALANCED:  # contiguous runs, sizes differing by at most one
        gpus = _gpus()
        return [torch.device("cuda", b * gpus // n_blocks) for b in range(n_blocks)]
    index = {**{b: b for b in range(n_blocks)}, **{f"{stack_name}.{b}": b for b in range(n_blocks)}}
    unknown = [k for k in spec if isinstance(k, bool) or not isinstance(k, (int, str)) or k not in index]
    if unknown:
        raise ConfigError(f"device_map: key(s) {', '.join(map(repr, unknown))} name no block; keys are block "
                          f"indices 0 to {n_blocks - 1} or prefixes '{stack_name}.0' to '{stack_name}.{n_blocks - 1}' "
                          "(the modules outside the blocks run on block 0's device)")
    placed: dict[int, Any] = {}
    for key in spec:
        b = index[key]
        if b in placed:
            raise ConfigError(f"device_map: block {b} is given twice ({placed[b]!r} and {key!r})")
        placed[b] = key
    missing = [b for b in range(n_blocks) if b not in placed]
    if missing:
        raise ConfigError(f"device_map: block(s) {_ranges(missing)} have no device; give every block 0 to "
                          f"{n_blocks - 1} one device")
    return [resolve_device(spec[placed[b]]) for b in range(n_blocks)]


def _ranges(blocks: list[int]) -> str:
    """Sorted block indices as inclusive ranges: ``[2, 3, 7]`` -> ``'2-3, 7'``."""
    runs: list[list[int]] = []
    for b in blocks:
        if runs and runs[-1][1] == b - 1:
            runs[-1][1] = b
        else:
            runs.append([b, b])
    return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0

"""Names every layer agrees on: where a module's block index sits, and the package's layer folders.

A transformer's repeated blocks are named ``<stack>.<index>.<...>`` (``model.layers.12.mlp``,
``transformer.h.3.attn``, ``encoder.layer.5.output``). ``block_of`` reads the index;
``layer_dir`` turns it into the package folder that stores the module.

>>> block_of("model.layers.12.mlp.up_proj.weight"), block_of("lm_head")
(12, None)
>>> layer_dir(block_of("model.layers.3.self_attn.q_proj")), layer_dir(None)
('layer_003', 'outer')
"""
from __future__ import annotations

import re

DEFAULT_BLOCK_PATTERN = r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\."
OUTER = "outer"  # package folder of the modules outside the blocks (embeddings, head, final norm)

LEVELS = (1, 2, 3, 4, 5)
# One colour per level, used by every figure and widget (Vega's category palette).
LEVEL_COLORS = {1: "#4C78A8", 2: "#F58518", 3: "#E45756", 4: "#72B7B2", 5: "#54A24B"}


def block_of(name: str, block_pattern: str = DEFAULT_BLOCK_PATTERN) -> int | None:
    """Block index in a module or parameter name, None outside blocks.

    >>> block_of("transformer.h.0.attn.c_attn")
    0
    """
    match = re.search(block_pattern, name)
    return int(match.group(1)) if match else None


def stack_of(name: str, block_pattern: str = DEFAULT_BLOCK_PATTERN) -> str:
    """The text before the block index, e.g. ``'model.layers.'``: tells encoder from decoder stacks.

    >>> stack_of("model.layers.2.mlp.down_proj"), stack_of("lm_head")
    ('model.layers.', '')
    """
    match = re.search(block_pattern, name)
    return name[: match.start(1)] if match else ""


def layer_dir(block: int | None) -> str:
    """The package folder of a block (``layer_007``), ``outer`` outside the blocks."""
    return OUTER if block is None else f"layer_{block:03d}"

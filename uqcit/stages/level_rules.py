"""The rules that give each module its level: editable data, one ``RuleSet`` per model family.

A ``RuleSet`` is an ordered tuple of ``LevelRule`` (regex on the module's dotted name -> level
and role), first match wins, plus the regex that finds block indices. Built-in sets cover the
llama-like family, GPT-2, BERT and a generic fallback; ``register_ruleset`` adds yours, and
``ruleset_for`` picks one by ``model.config.model_type``. ``uqcit.stages.levels`` applies them.

>>> ruleset_for("mistral").name, LLAMA_RULES.match("model.layers.0.self_attn.o_proj").level
('llama', 3)
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, ClassVar

from uqcit.core.config import ConfigError
from uqcit.core.keys import check_keys
from uqcit.core.names import DEFAULT_BLOCK_PATTERN, LEVELS


@dataclasses.dataclass(frozen=True)
class LevelRule:
    """Modules whose dotted name matches ``pattern`` (``re.search``) get ``level`` and ``role``."""

    pattern: str  # regex searched in the module name, e.g. r"(?:^|\.)q_proj$"
    level: int  # 1..5
    role: str  # what the module does: "q", "attn_out", "down", "lm_head"...

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"LevelRule {self.pattern!r}: level must be one of {LEVELS}, got {self.level!r}")
        if not self.role:
            raise ValueError(f"LevelRule {self.pattern!r}: role must be a non-empty string")
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"LevelRule pattern {self.pattern!r} is not a valid regex: {exc}") from None

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None  # re caches compiled patterns

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "level": self.level, "role": self.role}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LevelRule":
        check_keys(data, {"pattern", "level", "role"}, "LevelRule")
        level = data["level"]
        if isinstance(level, bool) or not isinstance(level, int):
            raise ConfigError(f"LevelRule.level: expected an integer, got {level!r}")
        return cls(pattern=str(data["pattern"]), level=level, role=str(data["role"]))


@dataclasses.dataclass(frozen=True)
class RuleSet:
    """A named, ordered tuple of rules (first match wins) plus the regex that finds block indices.

    >>> rs = RuleSet("mine", (LevelRule(r"(?:^|\\.)mixer$", 4, "up"),))
    >>> RuleSet.from_json(rs.to_json()) == rs
    True
    """

    name: str
    rules: tuple[LevelRule, ...]
    block_pattern: str = DEFAULT_BLOCK_PATTERN  # group 1 = block index

    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("RuleSet name must be a non-empty string")
        rules = tuple(self.rules)  # a list is accepted; stored as a tuple so the set is hashable
        for rule in rules:
            if not isinstance(rule, LevelRule):
                raise TypeError(f"RuleSet {self.name!r}: rules must be LevelRule, got {type(rule).__name__}")
        object.__setattr__(self, "rules", rules)
        try:
            groups = re.compile(self.block_pattern).groups
        except re.error as exc:
            raise ValueError(f"RuleSet {self.name!r}: block_pattern is not a valid regex: {exc}") from None
        if groups < 1:
            raise ValueError(f"RuleSet {self.name!r}: block_pattern needs a group capturing the block index")

    def match(self, name: str) -> LevelRule | None:
        """The first rule matching module ``name``, or None."""
        for rule in self.rules:
            if rule.matches(name):
                return rule
        return None

    def with_rules(self, *rules: LevelRule, name: str | None = None) -> "RuleSet":
        """A copy with ``rules`` tried before this set's own (so they override it)."""
        return dataclasses.replace(self, name=name or self.name, rules=tuple(rules) + self.rules)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "name": self.name,
            "block_pattern": self.block_pattern,
            "rules": [r.to_dict() for r in self.rules],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RuleSet":
        check_keys(data, {"version", "name", "block_pattern", "rules"}, "RuleSet", required={"name", "rules"})
        version = data.get("version", cls.version)
        if version != cls.version:
            raise ConfigError(f"RuleSet is version {cls.version}; this data has version {version!r}")
        if not isinstance(data["rules"], list):
            raise ConfigError(f"RuleSet.rules: expected a list, got {data['rules']!r}")
        return cls(
            name=str(data["name"]),
            rules=tuple(LevelRule.from_dict(r) for r in data["rules"]),
            block_pattern=str(data.get("block_pattern", DEFAULT_BLOCK_PATTERN)),
        )

    @classmethod
    def from_json(cls, text: str) -> "RuleSet":
        return cls.from_dict(json.loads(text))


def _r(pattern: str, level: int, role: str) -> LevelRule:
    return LevelRule(pattern, level, role)


# Leaf-name anchor: matches at the start of the name or after a dot, so the same
# rules fit a base model ("layers.0.self_attn.q_proj") and a head model ("model.layers...").
_A = r"(?:^|\.)"

# Task heads on top of any backbone: classification, QA, pooler. L5: output side.
_HEAD_RULES = (
    _r(_A + r"(?:score|classifier|qa_outputs)(?:\.(?:dense|out_proj))?$", 5, "head"),
    _r(_A + r"pooler\.dense$", 5, "head"),
)

LLAMA_RULES = RuleSet(
    "llama",
    (
        _r(_A + r"embed_tokens$", 1, "embed"),
        _r(_A + r"q_proj$", 2, "q"),
        _r(_A + r"k_proj$", 2, "k"),
        _r(_A + r"v_proj$", 2, "v"),
        _r(_A + r"qkv_proj$", 2, "qkv"),  # phi3 fuses Q, K and V
        _r(_A + r"o_proj$", 3, "attn_out"),
        _r(_A + r"gate_proj$", 4, "gate"),
        _r(_A + r"up_proj$", 4, "up"),
        _r(_A + r"gate_up_proj$", 4, "gate_up"),  # phi3 fuses gate and up
        _r(_A + r"down_proj$", 4, "down"),
        _r(r"^lm_head$", 5, "lm_head"),
        *_HEAD_RULES,
    ),
)

GPT2_RULES = RuleSet(
    "gpt2",
    (
        _r(_A + r"wte$", 1, "embed"),
        _r(_A + r"wpe$", 1, "position"),
        # Cross-attention first: its c_attn/c_proj would otherwise read as self-attention.
        _r(_A + r"crossattention\.(?:c_attn|q_attn|c_proj)$", 3, "cross_attn"),
        _r(_A + r"attn\.c_attn$", 2, "qkv"),  # fused Q, K, V
        _r(_A + r"attn\.c_proj$", 3, "attn_out"),
        _r(_A + r"mlp\.c_fc$", 4, "up"),
        _r(_A + r"mlp\.c_proj$", 4, "down"),  # same leaf name as attn.c_proj, different role
        _r(r"^lm_head$", 5, "lm_head"),
        _r(_A + r"multiple_choice_head\.summary$", 5, "head"),
        *_HEAD_RULES,
    ),
)

BERT_RULES = RuleSet(
    "bert",
    (
        _r(_A + r"embeddings\.word_embeddings$", 1, "embed"),
        _r(_A + r"embeddings\.position_embeddings$", 1, "position"),
        _r(_A + r"embeddings\.token_type_embeddings$", 1, "token_type"),
        _r(_A + r"crossattention\.", 3, "cross_attn"),  # decoder configs add cross-attention
        _r(_A + r"attention\.self\.query$", 2, "q"),
        _r(_A + r"attention\.self\.key$", 2, "k"),
        _r(_A + r"attention\.self\.value$", 2, "v"),
        _r(_A + r"attention\.output\.dense$", 3, "attn_out"),
        _r(_A + r"intermediate\.dense$", 4, "up"),
        _r(_A + r"output\.dense$", 4, "down"),  # after attention.output.dense: first match wins
        _r(_A + r"(?:cls\.predictions|lm_head)\.decoder$", 5, "lm_head"),
        _r(_A + r"(?:cls\.predictions\.transform|lm_head)\.dense$", 5, "head"),
        _r(_A + r"cls\.seq_relationship$", 5, "head"),
        *_HEAD_RULES,
    ),
)

# Names used across many HF architectures (GPT-NeoX, OPT, Falcon, BLOOM, GPT-J,
# Phi, T5, BART, DistilBERT...), for model types without a dedicated set.
GENERIC_RULES = RuleSet(
    "generic",
    (
        # Cross-attention first: its q/k/v/out leaves look like self-attention ones.
        _r(r"(?i)(?:^|\.)(?:cross_?attn|crossattention|encoder_attn|EncDecAttention)\.", 3, "cross_attn"),
        _r(_A + r"(?:embed_tokens|wte|word_embeddings|tok_embeddings|embed_in|shared|token_embedding)$",
           1, "embed"),
        _r(_A + r"(?:embed_positions|wpe|position_embeddings|position_embedding|pos_emb)$", 1, "position"),
        _r(_A + r"token_type_embeddings$", 1, "token_type"),
        _r(_A + r"relative_attention_bias$", 1, "position"),  # T5's learned relative positions
        _r(_A + r"project_in$", 1, "embed_proj"),  # OPT-350m projects embeddings up
        _r(_A + r"(?:c_attn|qkv_proj|query_key_value|Wqkv|W_pack|qkv|wqkv|att_proj)$", 2, "qkv"),
        _r(_A + r"(?:q_proj|query|q|wq|q_lin)$", 2, "q"),
        _r(_A + r"(?:k_proj|key|k|wk|k_lin)$", 2, "k"),
        _r(_A + r"(?:v_proj|value|v|wv|v_lin)$", 2, "v"),
        # Attention output: the leaf must sit inside an attention container, because
        # dense/c_proj/wo also name FFN projections.
        _r(r"(?i)(?:^|\.)[a-z_]*att[a-z_]*(?:\.output)?\.(?:o_proj|out_proj|c_proj|dense|o|wo|out_lin|proj)$",
           3, "attn_out"),
        _r(_A + r"(?:gate_proj|w1|wi_0)$", 4, "gate"),
        _r(_A + r"gate_up_proj$", 4, "gate_up"),
        _r(_A + r"(?:up_proj|c_fc|fc1|fc_in|dense_h_to_4h|w3|wi|wi_1|lin1|intermediate\.dense)$", 4, "up"),
        _r(_A + r"(?:down_proj|fc2|fc_out|dense_4h_to_h|w2|wo|lin2|output\.dense)$", 4, "down"),
        _r(r"(?i)(?:^|\.)(?:mlp|ffn|feed_forward|DenseReluDense)\.c_proj$", 4, "down"),
        _r(_A + r"(?:gate|router|shared_expert_gate)$", 4, "router"),  # MoE routers stored as Linear
        _r(_A + r"(?:lm_head|embed_out|output|lm_head\.decoder|cls\.predictions\.decoder)$", 5, "lm_head"),
        _r(_A + r"(?:cls\.predictions\.transform|lm_head)\.dense$", 5, "head"),
        _r(_A + r"project_out$", 5, "head"),
        *_HEAD_RULES,
    ),
)

RULESETS: dict[str, RuleSet] = {rs.name: rs for rs in (LLAMA_RULES, GPT2_RULES, BERT_RULES, GENERIC_RULES)}

# model.config.model_type -> ruleset name; any other type gets "generic".
MODEL_TYPE_RULESETS: dict[str, str] = {
    **{t: "llama" for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                            "phi3", "olmo", "olmo2", "granite", "smollm3", "helium", "cohere", "glm")},
    "gpt2": "gpt2",
    "gpt_bigcode": "gpt2",
    **{t: "bert" for t in ("bert", "roberta", "xlm-roberta")},
}


def register_ruleset(ruleset: RuleSet, model_types: tuple[str, ...] = ()) -> RuleSet:
    """Make ``ruleset`` selectable by name (``LevelsConfig(ruleset=...)``) and, optionally, by model type."""
    existing = RULESETS.get(ruleset.name)
    if existing is not None and existing != ruleset:
        raise ValueError(f"a different ruleset named {ruleset.name!r} is already registered")
    RULESETS[ruleset.name] = ruleset
    for model_type in model_types:
        MODEL_TYPE_RULESETS[model_type] = ruleset.name
    return ruleset


def ruleset_for(model_type: str | None) -> RuleSet:
    """The ruleset for a ``model.config.model_type``; unknown types get the generic one."""
    return RULESETS[MODEL_TYPE_RULESETS.get(model_type or "", "generic")]

"""Tiny random models of real Hugging Face families, for fast structural tests.

They are real ``transformers`` classes built from small configs, so every stage
meets the same module names and wiring it meets on full-size checkpoints. Their
tokenizer is a real byte-level ``PreTrainedTokenizerFast`` with 256 tokens, so
it can be saved into a package like any other tokenizer.
"""
from __future__ import annotations

import torch

TINY_FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "bert")

_VOCAB = 256


def byte_tokenizer():
    """A 256-token byte-level tokenizer (no merges), saveable with ``save_pretrained``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    return fast


def tiny_config(family: str):
    """The transformers config of a tiny model of ``family`` (one of ``TINY_FAMILIES``)."""
    from transformers import (
        BertConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    # Hidden 64 with 4 heads of 16: small enough for sub-second tests, still
    # divisible by the 32/64-wide quantization groups the tests use.
    common = dict(vocab_size=_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=512)
    if family == "llama":
        return LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True)
    if family == "mistral":
        return MistralConfig(**common, num_key_value_heads=2, tie_word_embeddings=False)
    if family == "qwen2":
        return Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True)
    if family == "gpt2":
        return GPT2Config(vocab_size=_VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=512,
                          bos_token_id=0, eos_token_id=0)
    if family == "bert":
        return BertConfig(**common)
    raise ValueError(f"unknown tiny family {family!r}; choose one of {TINY_FAMILIES}")


def tiny_model(family: str, seed: int = 0):
    """Build a tiny random ``family`` model and its byte tokenizer, deterministic under ``seed``.

    >>> model, tok = tiny_model("llama")
    >>> model.config.model_type
    'llama'
    """
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    config = tiny_config(family)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        if family == "bert":
            model = AutoModelForMaskedLM.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.random.set_rng_state(gen_state)
    model.eval()
    return model, byte_tokenizer()

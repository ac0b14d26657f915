"""Tiny debug models: what every test, the embedded default and the CPU benchmarks run against."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen2Config

from .model import A3ForCausalLM

FAMILIES = ("llama", "qwen2")


def tiny_base_config(
    family: str = "llama",
    vocab_size: int = 32,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 128,
    **kwargs,
) -> PretrainedConfig:
    """A decoder config of the given family (GQA on by default, as in Llama 3 / Qwen2)."""
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}.get(family)
    if cls is None:
        raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    return cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=kwargs.pop("bos_token_id", 1),
        eos_token_id=kwargs.pop("eos_token_id", 2),
        pad_token_id=kwargs.pop("pad_token_id", 0),
        **kwargs,
    )


def tiny_base_model(family: str = "llama", seed: int = 0, **kwargs) -> torch.nn.Module:
    """A randomly initialised `*ForCausalLM` (eval mode, fp32)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_base_config(family, **kwargs)).eval()


def tiny_a3_model(family: str = "llama", seed: int = 0, **kwargs) -> A3ForCausalLM:
    """An A3 model wrapping `tiny_base_model(family, seed)` (same weights, fresh query vector)."""
    return A3ForCausalLM.from_base(tiny_base_model(family, seed, **kwargs)).eval()

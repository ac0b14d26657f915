"""Tiny debug models: what every test, the embedded default and the CPU benchmarks run against."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    SmolLM3Config,
)

from a3lm.model.modeling import A3ForCausalLM

DEBUG_WINDOW = 4  # the windowed debug families' sliding window: shorter than most test rows

# Each family's own config class, with what makes its traps show on a tiny model: a window shorter
# than the test rows, soft-caps small enough to bite on tiny logits, multipliers other than 1, a
# layer without RoPE, local layers with their own RoPE base.
_FAMILY_CONFIGS: dict[str, tuple[type[PretrainedConfig], dict]] = {
    "llama": (LlamaConfig, {}),
    "qwen2": (Qwen2Config, {}),
    "qwen3": (Qwen3Config, {}),
    "mistral": (MistralConfig, {"sliding_window": DEBUG_WINDOW}),
    "gemma": (GemmaConfig, {}),
    # weights at std 0.1: attention logits large enough for a cap of 0.5 to change them
    "gemma2": (
        Gemma2Config,
        {
            "sliding_window": DEBUG_WINDOW,
            "attn_logit_softcapping": 0.5,
            "final_logit_softcapping": 1.0,
            "initializer_range": 0.1,
        },
    ),
    "gemma3": (
        Gemma3TextConfig,
        {
            "sliding_window": DEBUG_WINDOW,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        },
    ),
    "olmo2": (Olmo2Config, {}),
    "phi3": (Phi3Config, {}),
    "granite": (
        GraniteConfig,
        {
            "embedding_multiplier": 4.0,
            "attention_multiplier": 0.3,
            "residual_multiplier": 0.5,
            "logits_scaling": 2.0,
        },
    ),
    "smollm3": (SmolLM3Config, {"no_rope_layers": [1, 0]}),  # 1 = RoPE: the second layer has none
}
FAMILIES = tuple(_FAMILY_CONFIGS)
# The families whose costlier tests (every sequence enumerated, training paths) run: one per kind of
# trap (plain, biases, sliding windows + soft-capping, fused projections, multipliers).
CORE_FAMILIES = ("llama", "qwen2", "gemma2", "phi3", "granite")


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
    """A decoder config of the given family (GQA on by default, as in Llama 3 / Qwen2); `kwargs` override
    the family's debug settings."""
    if family not in _FAMILY_CONFIGS:
        raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    cls, family_kwargs = _FAMILY_CONFIGS[family]
    kwargs = {**family_kwargs, **kwargs}
    head_dim = hidden_size // num_attention_heads
    fields = cls.__dataclass_fields__
    for name in ("head_dim", "query_pre_attn_scalar"):  # Gemma's and Qwen3's defaults are not hidden / heads
        if name in fields:
            kwargs.setdefault(name, head_dim)
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


BPE_TEXT = ["the cat sat on the mat.", "a big dog ran to the cat.", "the mat is red and the dog is big."]


def tiny_byte_bpe(texts: list[str] | None = None, vocab_size: int = 300) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` (GPT-2 style, as SmolLM2's) trained on a few sentences,
    with <|endoftext|>, <|im_start|>, <|im_end|> as ids 0, 1, 2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((texts or BPE_TEXT) * 4, trainer)
    return tok


def tiny_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """`tiny_byte_bpe` as a transformers tokenizer with a BOS it never adds by itself (as SmolLM2's)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tiny_byte_bpe(),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )

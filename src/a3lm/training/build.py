"""What a run starts from: its tokenizer and its first model (loaded, or a tiny one from scratch).

Phases: stage 0 trains the base `*ForCausalLM` itself with its next-token loss; stages 1-3 train the
A3 model built from it (`A3ForCausalLM.from_base`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from a3lm.files import check_model_path
from a3lm.model.modeling import A3ForCausalLM
from a3lm.training.config import TrainConfig


def check_sources(cfg: TrainConfig) -> None:
    """Fail now, before anything loads or is written, on a missing model, tokenizer or data file."""
    from a3lm.data.sources import check_source_files

    if cfg.model.path is not None:
        check_model_path(cfg.model.path)
    if cfg.model.tokenizer is not None:
        check_model_path(cfg.model.tokenizer, "tokenizer")
    check_source_files(cfg.data)


def load_tokenizer(cfg: TrainConfig) -> Any:
    if cfg.model.tokenizer or cfg.model.path:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path, trust_remote_code=False)
    from a3lm.data.synthetic import default_hmm
    from a3lm.tokenizer import word_tokenizer

    return word_tokenizer(
        default_hmm(cfg.data.hmm_seed).words, model_max_length=cfg.model.max_position_embeddings
    )


def initial_base_model(cfg: TrainConfig, tokenizer: Any) -> nn.Module:
    """The plain `*ForCausalLM` a run starts from: loaded from model.path or a fresh tiny one whose
    vocabulary and BOS / EOS / pad ids are the tokenizer's."""
    if cfg.model.path is not None:
        from safetensors import SafetensorError
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=False)
        if getattr(config, "model_type", None) == "a3":
            raise ValueError(
                f"{cfg.model.path} is already an A3 model: stage 0 (plain AR) needs a base decoder"
            )
        try:
            return AutoModelForCausalLM.from_pretrained(
                cfg.model.path, dtype=torch.float32, trust_remote_code=False
            )
        except SafetensorError as err:
            raise OSError(f"corrupt checkpoint in {cfg.model.path}: {err}") from err
    from a3lm.model.debug import tiny_base_model

    m = cfg.model
    return tiny_base_model(
        m.family,
        seed=m.init_seed,
        vocab_size=len(tokenizer),
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads,
        max_position_embeddings=m.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def initial_a3_model(cfg: TrainConfig, tokenizer: Any) -> A3ForCausalLM:
    if cfg.model.path is not None:
        return A3ForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    return A3ForCausalLM.from_base(initial_base_model(cfg, tokenizer))


def initial_model(cfg: TrainConfig, kind: str, tokenizer: Any) -> nn.Module:
    """The first phase's model: the base decoder ("ar", stage 0) or the A3 model ("a3")."""
    return initial_base_model(cfg, tokenizer) if kind == "ar" else initial_a3_model(cfg, tokenizer)


def skeleton(model_config: dict[str, Any]) -> nn.Module:
    """A model of a checkpoint's architecture, its weights to be loaded next (the global RNG untouched)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from a3lm.quiet import quiet_transformers

    config = AutoConfig.for_model(**model_config)
    with torch.random.fork_rng(devices=[]), quiet_transformers():
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def base_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain CPU copy of `model`'s architecture holding `state` (FSDP: the gathered shards)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):  # its throwaway init must not move the RNG
        copy = AutoModelForCausalLM.from_config(model.config)
    copy.load_state_dict(state)
    return copy


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute the decoder layers in the backward (non-reentrant: reentrant breaks DDP's hooks)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

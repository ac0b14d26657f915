"""`A3Config`: a decoder config plus what the query stream adds."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from huggingface_hub.dataclasses import strict
from transformers import (
    AutoConfig,
    PretrainedConfig,
)
from transformers.configuration_utils import SubConfigSpec

from a3lm.files import check_text_config
from a3lm.model.attention import ATTENTION_BACKENDS

if TYPE_CHECKING:
    pass


@strict
class A3Config(PretrainedConfig):
    """An A3 model = a decoder config (`text_config`) + the query vector's initial scale.

    query_init_std: std of the query vector at initialisation; None = the std of the token
    embeddings (measured on the loaded embeddings when converting a pretrained checkpoint).
    query_self_attention: each query-stream slot also attends to its own slot (never to another's).
    Without it, a query seeing one content key (BOS only) is blind to its position: attention over a
    single key returns that key's value wherever the query sits, so every such position gets the same
    distribution. Its own slot depends only on earlier groups, so nothing leaks. False = XLNet's rule.
    attention_backend: "sdpa" (dense mask), "flex" (FlexAttention BlockMask over group-sorted
    positions), or "auto" = flex on CUDA, sdpa elsewhere.
    recompute_mlp: in training, gated MLPs (every supported family's: `mlp.GATED_MLPS`, Phi-3's fused
    gate_up_proj) keep only gate_proj(x) and up_proj(x) for backward and rebuild act(gate) * up
    there (`GatedDown`): the same values and gradients, two [rows, intermediate] activations fewer
    per layer (the two streams double the rows, and these are the largest activations), for two
    elementwise ops in backward.
    All are read at every forward, so changing them on a built model's config takes effect at once.
    """

    model_type = "a3"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PretrainedConfig | None = None
    query_init_std: float | None = None
    query_self_attention: bool = True
    attention_backend: str = "auto"
    recompute_mlp: bool = True
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """A saved config (config.json, a Hub download) must name its decoder: `A3Config()` alone
        defaults to a 32-layer 4096-wide Llama, which a config file must never build by omission."""
        check_text_config(config_dict, "the A3 config")
        return super().from_dict(config_dict, **kwargs)

    def __post_init__(self, **kwargs):
        # Held as given, the caller's decoder config would be reset to this config's attention
        # implementation (the base post-init sets it on every sub-config) and share every later change.
        if isinstance(self.text_config, PretrainedConfig):
            self.text_config = copy.deepcopy(self.text_config)
        super().__post_init__(**kwargs)
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"unknown attention_backend {self.attention_backend!r}; "
                f"choose {', '.join(ATTENTION_BACKENDS)}"
            )
        # The decoder config owns the tying flag; the composite model reads it from here.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))

"""Which decoder families A3 runs, and why the others are refused: the one table the rest reads.

A family is supported when every piece of its decoder is something the two streams pass through
unchanged or that a3lm handles explicitly (tests/model/ checks each listed family):

- per-row pieces (RMSNorm / LayerNorm, Q/K norms, post-norms, MLPs, Granite's multipliers, RoPE of
  any base per layer, layers without RoPE) see each row alone, so running them on [content ; query]
  rows is exact;
- attention goes through `a3_attention`, which keeps sliding windows (intersected with the group
  rule) and attention-logit soft-capping (Gemma 2);
- what `*ForCausalLM` does after its lm_head (Granite's logits_scaling, Gemma 2/3's final soft-capping)
  is redone by `A3ForCausalLM.logits`; scaled embeddings (Gemma) scale the query vector as well.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig


@dataclass(frozen=True)
class Family:
    """A supported decoder family: its config's model_type and what in it needed care."""

    model_type: str
    name: str
    notes: str


SUPPORTED: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "Llama", "the reference family (Llama 2/3, SmolLM2)"),
        Family("mistral", "Mistral", "all-window sliding attention when sliding_window is set"),
        Family("qwen2", "Qwen2", "QKV biases; windows on the layers from max_window_layers on"),
        Family("qwen3", "Qwen3", "per-head Q/K RMSNorm"),
        Family("gemma", "Gemma", "embeddings scaled by sqrt(hidden); GELU-tanh gated MLP; (1 + w) RMSNorm"),
        Family("gemma2", "Gemma 2", "attention and final soft-caps; alternating local/global; post-norms"),
        Family("gemma3_text", "Gemma 3 (text)", "Q/K norms; local/global layers with their own RoPE bases"),
        Family("olmo2", "OLMo 2", "post-norms; Q/K RMSNorm over all heads"),
        Family("phi3", "Phi-3", "fused qkv_proj and gate_up_proj"),
        Family("granite", "Granite", "embedding, attention, residual multipliers; logits_scaling"),
        Family("smollm3", "SmolLM3", "layers without RoPE (NoPE every 4th layer)"),
    )
}

_SEQUENTIAL = "layers read tokens in sequence order: no attention mask can give them a group order"
# One line each for families a user is likely to try; anything else gets the generic line.
REFUSED: dict[str, str] = {
    "gemma3": "the Gemma 3 vision-language wrapper: convert its text decoder (model_type gemma3_text)",
    "gemma3n": "per-layer token embeddings and AltUp streams have no value for a query-stream slot",
    "mamba": f"its state-space {_SEQUENTIAL}",
    "mamba2": f"its state-space {_SEQUENTIAL}",
    "jamba": f"its Mamba {_SEQUENTIAL}",
    "falcon_h1": f"its Mamba {_SEQUENTIAL}",
    "granitemoehybrid": f"its Mamba {_SEQUENTIAL}",
    "qwen3_next": f"its linear-attention {_SEQUENTIAL}",
    "gpt2": "absolute learned position embeddings and a Conv1D attention a3lm does not test",
    "mixtral": "mixture-of-experts MLPs: routing over doubled two-stream rows is not tested",
    "qwen2_moe": "mixture-of-experts MLPs: routing over doubled two-stream rows is not tested",
    "qwen3_moe": "mixture-of-experts MLPs: routing over doubled two-stream rows is not tested",
}


def refusal(model_type: str) -> str | None:
    """None for a supported model_type, else one line naming it and why it is refused."""
    if model_type in SUPPORTED:
        return None
    why = REFUSED.get(model_type, "not one of the families a3lm runs and tests")
    names = ", ".join(f.model_type for f in SUPPORTED.values())
    return f"model type {model_type!r} is not supported: {why} (a3lm runs {names})"


def check_supported(text_config: PretrainedConfig) -> None:
    """Raise ValueError with one line when the decoder config is not one A3 runs exactly."""
    line = refusal(text_config.model_type)
    if line is not None:
        raise ValueError(line)
    if getattr(text_config, "use_bidirectional_attention", False):
        raise ValueError(f"{text_config.model_type}: use_bidirectional_attention makes it an encoder")


def sliding_window(text_config: PretrainedConfig) -> int | None:
    """The window (in tokens) of the decoder's windowed layers, or None when every layer is global.

    Mistral and Phi-3 window every layer when `sliding_window` is set; Qwen2/3, SmolLM3 and Gemma 2/3
    window the layers their `layer_types` name "sliding_attention" (Qwen2/3 only with use_sliding_window).
    """
    window = getattr(text_config, "sliding_window", None)
    if window is None or getattr(text_config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)

"""Hugging Face's generate() API on A3 decoding: `model.generate`, `pipeline("text-generation")`, streamers.

`import a3lm` registers `generate` below as `A3ForCausalLM.generate` (the model layer does not import
the decoding layer; it holds a hook, as transformers' AttentionInterface does), so that

    model = AutoModelForCausalLM.from_pretrained(a3_dir)     # after `import a3lm`
    model.generate(input_ids, attention_mask=mask, max_new_tokens=32, do_sample=False)

runs `a3lm.sample` with the exact cache. Left to right, one token per step is the default, and greedy
generate() is `a3lm.sample(..., temperature=0)` token for token. The A3 options (order, group_size,
dynamic, criterion, per_step, threshold, speculative, speculative_schedule, seed, stop_at_eos) come
from `generation_config.a3` (a dict, saved with the generation config), from attributes of that name
on the generation config, or as keywords (`a3={...}` or each by name), later ones winning.
Every generation option that A3 decoding cannot honour (beam search, repetition penalty, logits
processors, ...) is a ValueError that names it.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import ModelOutput

from a3lm.decoding.api import sample
from a3lm.decoding.canvas import Canvas, StepLogits
from a3lm.decoding.config import DecodingConfig
from a3lm.model.modeling import A3ForCausalLM, A3PreTrainedModel

A3_OPTIONS = (
    "order",
    "group_size",
    "dynamic",
    "criterion",
    "per_step",
    "threshold",
    "speculative",
    "speculative_schedule",
    "seed",
    "stop_at_eos",
)
# GenerationConfig fields generate() honours; any other field set to a value other than its default is refused
HONOURED = frozenset(
    {
        "max_new_tokens",
        "max_length",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "eos_token_id",
        "pad_token_id",
        "bos_token_id",
        "use_cache",
        "num_return_sequences",
        "return_dict_in_generate",
        "a3",
        *A3_OPTIONS,
    }
)
SAMPLING_FIELDS = ("temperature", "top_k", "top_p")
# generate()'s own arguments (not generation-config fields) that A3 decoding has no use for
REFUSED_ARGUMENTS = (
    "logits_processor",
    "stopping_criteria",
    "prefix_allowed_tokens_fn",
    "synced_gpus",
    "assistant_model",
    "negative_prompt_ids",
    "negative_prompt_attention_mask",
    "custom_generate",
    "inputs_embeds",
    "position_ids",
    "past_key_values",
)


@dataclass
class A3GenerateOutput(ModelOutput):
    """generate()'s output with `return_dict_in_generate=True`, in Hugging Face's layout [B, L + T].

    sequences: the input ids as given, then the new tokens (pad_token_id after a row's EOS).
    fill_step: -1 on padding, 0 on prompt tokens, t >= 1 on a token generated at decoding step t (the
    fill order: 1, 2, 3, ... left to right with one token per step).
    num_steps: decoder forwards.
    """

    sequences: torch.LongTensor | None = None
    fill_step: torch.LongTensor | None = None
    num_steps: int | None = None


def _default_config() -> GenerationConfig:
    config = GenerationConfig()
    config.update(**config._get_default_generation_params(), defaults_only=True)
    return config


def _same(a: Any, b: Any) -> bool:
    return a == b or (a in (None, False) and b in (None, False))


def resolve_generation_config(
    model: A3ForCausalLM, generation_config: GenerationConfig | None, kwargs: dict[str, Any]
) -> tuple[GenerationConfig, dict[str, Any]]:
    """The generation config of one call, as transformers builds it (the call's config or a fresh one,
    then the model's `generation_config` where unset, then the global defaults, then the keywords), and
    the A3 options it carries. Keywords that are neither generation fields nor A3 options are an error;
    so is every field set to a value A3 decoding cannot honour."""
    kwargs = dict(kwargs)
    a3_kw = kwargs.pop("a3", None) or {}
    named_a3 = {name: kwargs.pop(name) for name in A3_OPTIONS if name in kwargs}
    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    config.update(**model.generation_config.to_dict(), defaults_only=True, allow_custom_entries=True)
    config.update(**config._get_default_generation_params(), defaults_only=True)
    unknown = config.update(**kwargs)
    if unknown:
        raise ValueError(
            f"generate() got unknown option(s) {', '.join(sorted(unknown))}: neither a GenerationConfig "
            "field nor an "
            f"A3 option ({', '.join(A3_OPTIONS)})"
        )
    reference = _default_config()
    refused = [
        f"{key}={value!r}"
        for key, value in config.to_dict().items()
        if not key.startswith("_")
        and key != "transformers_version"
        and key not in HONOURED
        and not _same(value, getattr(reference, key, None))
    ]
    if refused:
        raise ValueError(
            f"an A3 model's generate() cannot honour {', '.join(refused)}: it runs a3lm's decoding (greedy, "
            "or sampling "
            "with temperature / top_k / top_p, in any A3 order), which has no such option"
        )
    options: dict[str, Any] = {}
    for source in (
        getattr(config, "a3", None) or {},
        {k: getattr(config, k) for k in A3_OPTIONS if hasattr(config, k)},
        a3_kw,
        named_a3,
    ):
        bad = set(source) - set(A3_OPTIONS)
        if bad:
            raise ValueError(
                f"unknown A3 option(s) {', '.join(sorted(bad))}; the A3 options are {', '.join(A3_OPTIONS)}"
            )
        options.update(source)
    return config, options


def decoding_config(config: GenerationConfig, options: dict[str, Any]) -> DecodingConfig:
    """The DecodingConfig of a resolved generation config and its A3 options (greedy unless do_sample)."""
    if config.do_sample:
        if not config.temperature or config.temperature <= 0:
            raise ValueError(
                f"do_sample=True needs temperature > 0, got {config.temperature}: use do_sample=False for "
                "greedy"
            )
        sampling = {
            "temperature": float(config.temperature),
            "top_k": config.top_k or None,
            "top_p": config.top_p,
        }
    else:
        reference = _default_config()
        ignored = [
            f"{k}={getattr(config, k)!r}"
            for k in SAMPLING_FIELDS
            if not _same(getattr(config, k), getattr(reference, k))
        ]
        if ignored:  # transformers ignores them too, with the same warning
            warnings.warn(
                f"do_sample=False (greedy): {', '.join(ignored)} apply to sampling only and are ignored",
                stacklevel=3,
            )
        sampling = {"temperature": 0.0}
    eos = config.eos_token_id
    eos_ids = None if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = config.pad_token_id if config.pad_token_id is not None else eos_ids[0] if eos_ids else None
    return DecodingConfig(
        **sampling, eos_token_id=eos_ids, pad_token_id=pad, use_cache=bool(config.use_cache), **options
    )


class _StreamFeed:
    """Feeds a streamer the committed tokens of row 0's continuation (canvas columns start..end) in text
    order, one token per `put`: each token once every position before it is filled (left to right:
    as it is committed), up to and including the first EOS."""

    def __init__(self, streamer: BaseStreamer, start: int, end: int, eos_ids: set[int]):
        self.streamer, self.next_col, self.end, self.eos_ids = streamer, start, end, eos_ids

    def __call__(self, canvas: Canvas, step: int, logits: StepLogits) -> None:
        if self.next_col >= self.end:
            return
        filled = canvas.filled[0, self.next_col : self.end].tolist()
        n = filled.index(False) if False in filled else len(filled)
        tokens = canvas.ids[0, self.next_col : self.next_col + n].tolist()
        self.next_col += n
        for token in tokens:
            self.streamer.put(torch.tensor([token]))
            if token in self.eos_ids:
                self.next_col = self.end
                return


def _input_ids(
    model: A3ForCausalLM, inputs: torch.Tensor | None, kwargs: dict[str, Any], bos: int | None
) -> torch.Tensor:
    input_ids = kwargs.pop("input_ids", None)
    if inputs is not None and input_ids is not None:
        raise ValueError("give the prompt ids once: as `inputs` or as `input_ids`, not both")
    input_ids = inputs if input_ids is None else input_ids
    if input_ids is None:  # no prompt: start from BOS, as transformers does
        if bos is None:
            raise ValueError("generate() without input_ids starts from bos_token_id, which is not set")
        return torch.tensor([[bos]], device=model.device)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(
            "input_ids must be a [B, L] tensor of token ids, got "
            f"{getattr(input_ids, 'shape', type(input_ids))}"
        )
    return input_ids


def generate(
    model: A3ForCausalLM,
    inputs: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    streamer: BaseStreamer | None = None,
    generator: torch.Generator | None = None,
    tokenizer: Any = None,
    **kwargs: Any,
) -> torch.Tensor | A3GenerateOutput:
    """Hugging Face's `generate()` for an A3 model (registered as `A3ForCausalLM.generate`).

    inputs / input_ids, attention_mask: [B, L] prompts, left-padded as transformers expects of a
    decoder-only model (any padding side works: padding is skipped). Generation options come from
    `generation_config` and keywords, over the model's `generation_config`, as in transformers:
    max_new_tokens (or max_length, prompt included), do_sample, temperature, top_k, top_p (with
    transformers' defaults: greedy unless do_sample, top_k=50 when sampling), eos_token_id (one id or a
    list), pad_token_id, use_cache (False: the full two-stream forward every step), num_return_sequences
    (sampling), return_dict_in_generate; and the A3 options (see the module docstring). Anything else
    raises ValueError naming it.
    generator: draws every random choice (tokens, a random order); default: one seeded from torch's
    global generator (so `torch.manual_seed` makes generate() reproducible), or by the A3 option `seed`.
    streamer (batch of one): gets the prompt ids, then each new token, one per `put`, as soon as every
    position before it is filled, then `end()`. Left to right that is as each token is committed; in
    another order a token waits for the positions before it (right to left: all at the end).
    tokenizer: accepted for transformers' signature, unused (it serves stop_strings, refused here).
    Returns [B, L + T]: the input ids as given, then the new tokens, pad_token_id after a row's EOS, T the
    most new tokens of any row (an `A3GenerateOutput` with return_dict_in_generate).
    """
    for name in REFUSED_ARGUMENTS:
        value = kwargs.pop(name, None)
        if value is not None and not (isinstance(value, list | tuple) and not value) and value is not False:
            raise ValueError(
                f"an A3 model's generate() cannot honour {name}: a3lm's decoding has no such hook"
            )
    attention_mask = kwargs.pop("attention_mask", None)
    config, options = resolve_generation_config(
        model, generation_config, {k: v for k, v in kwargs.items() if k != "input_ids"}
    )
    input_ids = _input_ids(model, inputs, kwargs, config.bos_token_id)
    cfg = decoding_config(config, options)
    device = model.device
    input_ids = input_ids.to(device)
    if attention_mask is None:  # transformers' rule: pad tokens are padding unless pad is also EOS
        pad_is_eos = cfg.eos_token_id is not None and cfg.pad_token_id in cfg.eos_token_id
        if cfg.pad_token_id is not None and not pad_is_eos and bool((input_ids == cfg.pad_token_id).any()):
            attention_mask = (input_ids != cfg.pad_token_id).long()
        else:
            attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}"
        )

    L = input_ids.shape[1]
    max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - L
    if max_new < 1:
        raise ValueError(
            f"nothing to generate: max_length={config.max_length} leaves no room after the {L} input tokens; "
            "set max_new_tokens"
        )
    n_return = config.num_return_sequences or 1
    if n_return > 1:
        if not config.do_sample:
            raise ValueError(
                f"num_return_sequences={n_return} needs do_sample=True: greedy decoding gives one sequence"
            )
        input_ids, attention_mask = (
            input_ids.repeat_interleave(n_return, 0),
            attention_mask.repeat_interleave(n_return, 0),
        )
    B = input_ids.shape[0]
    if generator is None and cfg.seed is None:
        generator = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, ())))

    lengths_B = attention_mask.bool().sum(1)
    feed = None
    if streamer is not None:
        if B != 1:
            raise ValueError(
                f"a streamer takes one sequence: got {B} rows (batch {B // n_return} x num_return_sequences "
                f"{n_return})"
            )
        streamer.put(input_ids.cpu())
        stops = cfg.stop_at_eos and cfg.eos_token_id is not None
        feed = _StreamFeed(
            streamer,
            int(lengths_B[0]),
            int(lengths_B[0]) + max_new,
            set(cfg.eos_token_id) if stops else set(),
        )
    out = sample(
        model, input_ids, attention_mask, length=max_new, config=cfg, generator=generator, on_step=feed
    )
    if streamer is not None:
        streamer.end()

    # the canvas holds row b's prompt at columns 0..l_b-1 and its continuation after it: move it after
    # the input
    cols_BT = lengths_B[:, None] + torch.arange(max_new, device=device)[None]
    new_BT = out.sequences.gather(1, cols_BT)
    kept_BT = out.attention_mask.gather(1, cols_BT).bool()
    width = int(kept_BT.any(0).nonzero().max()) + 1 if bool(kept_BT.any()) else 0
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    sequences = torch.cat([input_ids, new_BT[:, :width].masked_fill(~kept_BT[:, :width], pad)], dim=1)
    if not config.return_dict_in_generate:
        return sequences
    prompt_step = torch.where(attention_mask.bool(), 0, -1)
    new_step = out.fill_step.gather(1, cols_BT)[:, :width].masked_fill(~kept_BT[:, :width], -1)
    return A3GenerateOutput(
        sequences=sequences, fill_step=torch.cat([prompt_step, new_step], 1), num_steps=out.num_steps
    )


A3PreTrainedModel._generate_fn = generate

__all__ = ["A3_OPTIONS", "A3GenerateOutput", "decoding_config", "generate", "resolve_generation_config"]

"""Decoding an A3 model: group-wise AR sampling, infilling, dynamic resampling, speculative decoding.

Every mode is a loop over a *canvas* [B, N] of known tokens and blanks:

    step t: score some unfilled positions with the query stream (they see every committed token),
            draw a token for each, commit some of them as a new group.

- group-wise: the blanks are split up front into groups of `group_size` in a fill order
  (`groups.fill_groups`); step t scores and commits exactly group t.
- dynamic resampling: step t scores every unfilled position and commits the best `per_step` by a
  criterion (or all above a confidence `threshold`, at least one).
- speculative (`speculative=k`, see `a3lm.speculative`): k positions of a singleton order drafted at
  once, verified in one forward; samples follow the singleton order's joint exactly.

Known tokens (prompt, or prefix and suffix when infilling) are left-to-right singleton groups that
come before every blank, and are never changed. With `use_cache=True` each step is one forward of
[content just committed ; queries of the positions to score] against an exact KV cache
(`A3ForCausalLM.decode_step`); `use_cache=False` recomputes the full two-stream forward over the whole
canvas every step (the reference: same tokens, same logits up to float rounding). Every option lives in
`DecodingConfig`; `sample` and `infill` take one, or its fields as keywords.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from a3lm.decoding.canvas import Canvas, GenerationOutput, StepHook
from a3lm.decoding.config import DecodingConfig
from a3lm.decoding.groupwise import decode_groups
from a3lm.files import check_tokenizer_files, require_a3
from a3lm.groups import fill_groups
from a3lm.model.modeling import A3ForCausalLM, max_positions

# -- public API ------------------------------------------------------------------------------------


def eos_ids_of(model: A3ForCausalLM, cfg: DecodingConfig) -> torch.Tensor | None:
    """Every id that ends a row (the config's, else the model's: Llama 3 lists several), or None."""
    eos = (
        cfg.eos_token_id
        if cfg.eos_token_id is not None
        else getattr(model.config.text_config, "eos_token_id", None)
    )
    if not cfg.stop_at_eos or eos is None:
        return None
    return torch.tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long, device=model.device)


def pad_id_of(model: A3ForCausalLM, cfg: DecodingConfig) -> int:
    if cfg.pad_token_id is not None:
        return cfg.pad_token_id
    pad = getattr(model.config.text_config, "pad_token_id", None)
    return 0 if pad is None else pad


def _run(
    model,
    canvas: Canvas,
    cfg: DecodingConfig,
    generator,
    eos_ids,
    output_logits,
    order_generators: Sequence[torch.Generator] | None,
    on_step: StepHook | None = None,
) -> GenerationOutput:
    generator = generator if generator is not None else cfg.make_generator(model.device)
    if order_generators is not None and len(order_generators) != canvas.ids.shape[0]:
        raise ValueError(
            f"order_generators needs one generator per row: got {len(order_generators)} for "
            f"{canvas.ids.shape[0]} rows"
        )
    order_source = generator if order_generators is None else order_generators
    pad = pad_id_of(model, cfg)
    if cfg.speculative:
        from a3lm.decoding.speculative import decode_speculative

        return decode_speculative(
            model, canvas, cfg, generator, eos_ids, pad, output_logits, order_source, on_step
        )
    blank = canvas.real & ~canvas.known
    fill_group = None if cfg.dynamic else fill_groups(blank, cfg.order, cfg.group_size, order_source)
    return decode_groups(model, canvas, fill_group, cfg, generator, eos_ids, pad, output_logits, on_step)


def sample(
    model: A3ForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    length: int,
    config: DecodingConfig | None = None,
    generator: torch.Generator | None = None,
    order_generators: Sequence[torch.Generator] | None = None,
    output_logits: bool = False,
    on_step: StepHook | None = None,
    **options,
) -> GenerationOutput:
    """Continue each prompt by `length` tokens.

    input_ids, attention_mask: [B, L] prompts, padded on either side (1 = real token).
    config: a DecodingConfig; keywords (any of its fields: group_size, order, dynamic, criterion,
    per_step, threshold, speculative, temperature, top_k, top_p, seed, stop_at_eos, eos_token_id,
    pad_token_id, use_cache) build one or replace its fields. A custom `order` is a permutation of
    0..length-1 (shared by every row, or a list with one per row).
    generator: every random draw (tokens, a random order, the random criterion); default: one seeded by
    config.seed. order_generators: one generator per row that draws that row's random order (random,
    random-blocks; group-wise and speculative) from its own blanks alone, so that a row's order, and
    its greedy output, do not depend on its batch or padding; token draws at temperature > 0 (and
    dynamic decoding's choices) still come from `generator` and depend on the batch.
    on_step: a `StepHook` called after every step with the canvas, the step and its logits (streaming:
    `canvas.filled` and `canvas.ids` say what is filled so far; tokens after a row's first EOS may still
    be committed; a row the hook marks `finished` is filled no further).
    Returns a canvas [B, N], N = max prompt length + length: row b holds its prompt then its
    continuation, left-aligned (position = column), padding on the right. With stop_at_eos, a row stops
    once a generated EOS has every earlier position filled, and every position after its first
    generated EOS becomes padding (eos_token_id defaults to the model config's).
    """
    cfg = DecodingConfig.build(config, **options)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    device = model.device
    input_ids = input_ids.to(device)
    prompt_real = (
        torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is None
        else attention_mask.to(device).bool()
    )
    lengths_B = prompt_real.sum(1)
    if bool((lengths_B == 0).any()):
        raise ValueError(
            f"empty prompt in row {int((lengths_B == 0).nonzero()[0])}: sampling needs at least one token "
            "(BOS)"
        )
    B, N = input_ids.shape[0], int(lengths_B.max()) + length
    max_pos = max_positions(model)
    if max_pos is not None and N > max_pos:
        raise ValueError(
            f"prompt ({int(lengths_B.max())} tokens) + length ({length}) = {N} exceeds the model's maximum "
            f"of {max_pos} positions"
        )
    eos_ids = eos_ids_of(model, cfg)

    # left-align: prompt token of rank r goes to column r, the continuation follows it
    cols = torch.arange(N, device=device)[None].expand(B, N)
    ids = torch.full((B, N), pad_id_of(model, cfg), dtype=torch.long, device=device)
    rank = prompt_real.long().cumsum(1) - 1
    rows = torch.arange(B, device=device)[:, None].expand_as(rank)
    ids[rows[prompt_real], rank[prompt_real]] = input_ids[prompt_real]
    canvas = Canvas.start(
        ids, cols < (lengths_B + length)[:, None], cols < lengths_B[:, None], cols.contiguous()
    )
    return _run(model, canvas, cfg, generator, eos_ids, output_logits, order_generators, on_step)


def infill(
    model: A3ForCausalLM,
    input_ids: torch.Tensor,
    known_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    config: DecodingConfig | None = None,
    generator: torch.Generator | None = None,
    order_generators: Sequence[torch.Generator] | None = None,
    output_logits: bool = False,
    on_step: StepHook | None = None,
    **options,
) -> GenerationOutput:
    """Fill the blanks (real & ~known) of each row; known tokens (prefix, suffix) are kept.

    input_ids, known_mask, attention_mask: [B, N] (ids at blanks are ignored). Every known token comes
    first (left-to-right singletons), so the blanks see both the prefix and the suffix. Options as in
    `sample` (generator, order_generators, on_step too); a custom `order` is, per row, a permutation of that
    row's blank ranks. No EOS handling (the EOS options are ignored): each blank has the length it was
    given. Returns the canvas [B, N].
    """
    cfg = DecodingConfig.build(config, **options)
    if input_ids.dim() != 2 or known_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and known_mask must both be [B, N], got {tuple(input_ids.shape)} and "
            f"{tuple(known_mask.shape)}"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    real = attention_mask.bool()
    max_pos = max_positions(model)
    if max_pos is not None and int(real.sum(1).max()) > max_pos:
        raise ValueError(f"{int(real.sum(1).max())} tokens exceed the model's maximum of {max_pos} positions")
    device = model.device
    real, known = real.to(device), known_mask.bool().to(device)
    positions = (real.long().cumsum(1) - 1).clamp(min=0)  # counted over real tokens, as in the model
    canvas = Canvas.start(input_ids.to(device), real, known, positions)
    return _run(model, canvas, cfg, generator, None, output_logits, order_generators, on_step)


def load_pretrained(path: str) -> tuple[A3ForCausalLM, PreTrainedTokenizerBase]:
    """An A3 checkpoint directory with a tokenizer saved in it: (model in eval, tokenizer). A plain
    decoder is refused: its query vector would be random (`a3lm convert` or train it first)."""
    require_a3(path)
    check_tokenizer_files(path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return A3ForCausalLM.from_pretrained(path).eval(), tokenizer

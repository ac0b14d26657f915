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

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .cache import ContentCache
from .decoding import CRITERIA, DecodingConfig, choose_tokens, criterion_scores, filter_logits, scoring_probs
from .groups import PAD_GROUP, fill_groups
from .model import A3ForCausalLM, max_positions, require_a3
from .tokenizer import encode_row


@dataclass
class StepLogits:
    """The logits of one decoding step: positions_BQ are canvas columns (-1 = padded slot)."""

    positions_BQ: torch.Tensor
    logits_BQV: torch.Tensor


@dataclass
class GenerationOutput:
    """What a decoding run returns; every tensor is [B, N] over the canvas.

    sequences: token ids (pad_token_id on padding). attention_mask: 1 = real token.
    fill_step: -1 padding, 0 given (prompt / known), t >= 1 generated at step t (the fill order).
    group_ids: the factorization actually used (known tokens left-to-right singletons, then one group
    per step; PAD_GROUP on padding), so `sequence_logprobs(model, sequences, group_ids,
    attention_mask)` scores the generated tokens under the order that produced them.
    num_steps: decoder forwards. step_logits: per step, the scored positions and their logits (only
    with output_logits=True). drafted / accepted: speculative decoding's verified drafts and how many
    of them were accepted (the first draft of a window, always accepted, is not counted).
    position_ids: each column's position, as decoding used it.
    untruncated: set when stopping at EOS dropped tokens that were committed after a row's first EOS.
    In an order other than left to right such a token may have come before kept ones and been their
    context, so the truncated output no longer scores exactly. The untruncated canvas (every token
    committed, with its group; positions never filled are holes) does, with its position_ids:
    `sequence_logprobs(model, w.sequences, w.group_ids, w.attention_mask, position_ids=w.position_ids)`
    for `w = out.untruncated or out`. Left to right, both agree on the kept tokens.
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    fill_step: torch.Tensor
    group_ids: torch.Tensor
    num_steps: int
    position_ids: torch.Tensor | None = None
    step_logits: list[StepLogits] | None = None
    drafted: int = 0
    accepted: int = 0
    untruncated: GenerationOutput | None = None


# -- the canvas and one decoding forward -----------------------------------------------------------


@dataclass
class Canvas:
    """Decoding state [B, N]: tokens, which are real / known / filled, their group and fill step."""

    ids: torch.Tensor
    real: torch.Tensor
    known: torch.Tensor
    positions: torch.Tensor
    filled: torch.Tensor
    group: torch.Tensor  # PAD_GROUP until committed
    fill_step: torch.Tensor
    finished: torch.Tensor  # [B]: stopped at EOS
    after_eos: torch.Tensor  # [B, N]: after a row's first generated EOS (dropped from the output)

    @classmethod
    def start(cls, ids_BN, real_BN, known_BN, positions_BN) -> Canvas:
        real = real_BN.bool()
        known = known_BN.bool() & real
        n_known_B = known.sum(1)
        if bool((n_known_B == 0).any()):
            raise ValueError(f"row {int((n_known_B == 0).nonzero()[0])} has no known token: decoding needs a prompt (at least BOS)")
        group = torch.where(known, known.long().cumsum(1) - 1, PAD_GROUP)
        finished = torch.zeros(ids_BN.shape[0], dtype=torch.bool, device=ids_BN.device)
        after_eos = torch.zeros_like(real)
        return cls(ids_BN.clone(), real, known, positions_BN, known.clone(), group, torch.where(known, 0, -1), finished, after_eos)

    @property
    def n_known(self) -> torch.Tensor:
        return self.known.sum(1)

    def unfilled(self) -> torch.Tensor:
        """[B, N]: what is left to fill; nothing after a row's first generated EOS (it is dropped)."""
        return self.real & ~self.filled & ~self.finished[:, None] & ~self.after_eos

    def commit(self, cols_BQ, tokens_BQ, chosen_BQ, groups_BQ, step: int) -> None:
        """Write tokens at cols where chosen, with their group ids and fill step (no host sync).

        cols may repeat within a row on slots that are not chosen (padding): scatter-adds of the chosen
        slots' values alone are exact where a sum of one nonzero term is.
        """
        hit_BN = torch.zeros_like(self.filled).scatter_add(1, cols_BQ, chosen_BQ)  # bool: adds are ors

        def put(t: torch.Tensor, values) -> torch.Tensor:
            values = torch.as_tensor(values, device=t.device).to(t.dtype).expand(cols_BQ.shape)
            written = torch.zeros_like(t).scatter_add(1, cols_BQ, values * chosen_BQ)
            return torch.where(hit_BN, written, t)

        self.ids, self.group, self.fill_step = put(self.ids, tokens_BQ), put(self.group, groups_BQ), put(self.fill_step, step)
        self.filled = self.filled | hit_BN

    def stop_at_eos(self, eos_ids: torch.Tensor | None) -> None:
        """Mark what follows each row's first generated EOS, and the rows with nothing left before it."""
        if eos_ids is None:
            return
        N = self.ids.shape[1]
        eos = self.filled & ~self.known & torch.isin(self.ids, eos_ids)
        first_B = torch.where(eos.any(1), eos.int().argmax(1), N)
        self.after_eos = self.real & ~self.known & (torch.arange(N, device=eos.device)[None] > first_B[:, None])
        self.finished |= ~(self.real & ~self.filled & ~self.after_eos).any(1) & eos.any(1)

    def output(self, eos_ids: torch.Tensor | None, pad_token_id: int, num_steps: int, **extra) -> GenerationOutput:
        """The canvas as output; with eos_ids, cut after each row's first generated EOS (`after_eos`, kept
        current by `stop_at_eos` after every commit)."""
        whole = self._as_output(self.real & self.filled, pad_token_id, num_steps, **extra)
        if eos_ids is None:
            return whole
        kept = self.real & self.filled & ~self.after_eos
        if bool(torch.equal(kept, self.real & self.filled)):
            return whole
        return self._as_output(kept, pad_token_id, num_steps, untruncated=whole, **extra)

    def _as_output(self, real: torch.Tensor, pad_token_id: int, num_steps: int, **extra) -> GenerationOutput:
        return GenerationOutput(
            sequences=self.ids.masked_fill(~real, pad_token_id),
            attention_mask=real.long(),
            fill_step=self.fill_step.masked_fill(~real, -1),
            group_ids=self.group.masked_fill(~real, PAD_GROUP),
            num_steps=num_steps,
            position_ids=self.positions,
            **extra,
        )


class StepForward:
    """One decoding forward: the cached step, or (use_cache=False) the full two-stream reference."""

    def __init__(self, model: A3ForCausalLM, batch_size: int, use_cache: bool):
        self.model = model
        self.cache = ContentCache(model, batch_size) if use_cache else None

    def __call__(self, canvas: Canvas, content_cols_BC, content_valid_BC, query_cols_BQ, query_valid_BQ, query_groups_BQ,
                 ids_BN: torch.Tensor | None = None, group_BN: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Logits [B, Q, V] of query slots (canvas columns) of the given groups, after appending the
        content at content_cols. ids_BN / group_BN: the canvas's with uncommitted content (drafts)."""
        ids = canvas.ids if ids_BN is None else ids_BN
        group = canvas.group if group_BN is None else group_BN
        pos = canvas.positions
        if self.cache is not None:
            return self.model.decode_step(
                self.cache, ids.gather(1, content_cols_BC), pos.gather(1, content_cols_BC), group.gather(1, content_cols_BC),
                content_valid_BC, pos.gather(1, query_cols_BQ), query_groups_BQ,
            )  # fmt: skip
        # reference: the whole canvas. Unassigned positions get a group above every query's (never seen);
        # the query slots scored carry their query group (their content is never seen either)
        group = torch.where(group >= 0, group, 2 * ids.shape[1] + 1)
        group = scatter_where(group, query_cols_BQ, query_valid_BQ, query_groups_BQ).masked_fill(~canvas.real, PAD_GROUP)
        logits_BNV = self.model(input_ids=ids, group_ids=group, attention_mask=canvas.real.long(), position_ids=pos).logits
        return logits_BNV.gather(1, query_cols_BQ[..., None].expand(-1, -1, logits_BNV.shape[-1]))


def scatter_where(target_BN: torch.Tensor, cols_BQ: torch.Tensor, where_BQ: torch.Tensor, values) -> torch.Tensor:
    """target with values written at cols where `where` holds (each written column at most once per row;
    cols of the other slots may repeat and point anywhere)."""
    values = torch.as_tensor(values, device=target_BN.device).to(target_BN.dtype).expand(cols_BQ.shape)
    hit_BN = torch.zeros_like(target_BN, dtype=torch.int32).scatter_add(1, cols_BQ, where_BQ.int()) > 0
    zero = torch.zeros((), dtype=target_BN.dtype, device=target_BN.device)
    written_BN = torch.zeros_like(target_BN).scatter_add(1, cols_BQ, torch.where(where_BQ, values, zero))
    return torch.where(hit_BN, written_BN, target_BN)


def mask_to_cols(mask_BN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns of the True entries of each row, left to right, padded: cols [B, M], valid [B, M]."""
    counts = mask_BN.sum(1)
    M = int(counts.max()) if mask_BN.numel() else 0
    cols = (~mask_BN).to(torch.int8).argsort(dim=1, stable=True)[:, :M]
    valid = torch.arange(M, device=mask_BN.device)[None] < counts[:, None]
    return cols, valid


def compact(cols_BQ: torch.Tensor, keep_BQ: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept slots of each row moved to the front: cols [B, W], valid [B, W] (W: the most kept)."""
    width = int(keep_BQ.sum(1).max()) if width is None else width
    first = (~keep_BQ).to(torch.int8).argsort(dim=1, stable=True)[:, :width]
    return cols_BQ.gather(1, first), keep_BQ.gather(1, first)


def _commit_dynamic(scores_BQ: torch.Tensor, valid_BQ: torch.Tensor, per_step: int, threshold: float | None):
    """[B, Q] bool: the `per_step` best valid slots of each row (fewer when fewer are left), or every
    slot with score >= threshold plus the best one (so that every step makes progress)."""
    scores = scores_BQ.masked_fill(~valid_BQ, float("-inf"))
    best = scores.argmax(-1, keepdim=True)
    if threshold is not None:
        chosen = (scores >= threshold).scatter(-1, best, True)
    else:
        top = scores.topk(min(per_step, scores.shape[1]), dim=-1).indices
        chosen = torch.zeros_like(valid_BQ).scatter(-1, top, True)
    return chosen & valid_BQ


# -- group-wise and dynamic decoding ---------------------------------------------------------------


def group_schedule(fill_group_BN: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per step t, the columns of every row's group t, left to right: (cols [B, W_t], valid [B, W_t]).

    Built once from the relative groups (-1: not filled), with two host syncs in all, so that a
    group-wise step needs none to find its queries.
    """
    B, N = fill_group_BN.shape
    cols = torch.arange(N, device=fill_group_BN.device).expand(B, N)
    n_steps = int(fill_group_BN.max()) + 1
    if n_steps == 0:
        return []
    fills = fill_group_BN >= 0
    order_BN = torch.where(fills, fill_group_BN * N + cols, n_steps * N + cols).argsort(dim=1)  # group-major
    counts_BT = torch.zeros(B, n_steps, dtype=torch.long, device=cols.device).scatter_add_(
        1, fill_group_BN.clamp(min=0), fills.long()
    )
    starts_BT = counts_BT.cumsum(1) - counts_BT
    schedule = []
    for t, width in enumerate(counts_BT.max(0).values.tolist()):
        slot = torch.arange(width, device=cols.device)
        valid = slot < counts_BT[:, t : t + 1]
        index = torch.where(valid, starts_BT[:, t : t + 1] + slot, 0)
        schedule.append((order_BN.gather(1, index), valid))
    return schedule


def _next_queries(canvas: Canvas, schedule, step: int, stops_at_eos: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The query slots of the next step (cols [B, Q], valid [B, Q]), or None when decoding is done:
    the schedule's next group (group-wise), or every unfilled position (dynamic). Finished rows get none."""
    if schedule is None:
        query_BN = canvas.unfilled()
        return mask_to_cols(query_BN) if bool(query_BN.any()) else None
    if step == len(schedule):
        return None
    cols, valid = schedule[step]
    if not stops_at_eos:  # no row stops early, and every step of the schedule has a group to fill
        return cols, valid
    if not bool(canvas.unfilled().any()):
        return None
    # a row may have nothing to fill this step (its group lies after its EOS) and more before its EOS later
    return cols, valid & ~canvas.finished[:, None] & ~canvas.after_eos.gather(1, cols)


@torch.no_grad()
def _decode(model, canvas: Canvas, fill_group_BN, cfg: DecodingConfig, generator, eos_ids, pad_token_id,
            output_logits: bool) -> GenerationOutput:  # fmt: skip
    """Group-wise (fill_group_BN: relative group of every blank) or dynamic (None) decoding."""
    forward = StepForward(model, canvas.ids.shape[0], cfg.use_cache)
    step_logits: list[StepLogits] | None = [] if output_logits else None
    content_cols, content_valid = mask_to_cols(canvas.known)
    schedule = None if fill_group_BN is None else group_schedule(fill_group_BN)
    n_known_B, step = canvas.n_known, 0
    while (queries := _next_queries(canvas, schedule, step, eos_ids is not None)) is not None:
        query_cols, query_valid = queries
        step += 1
        g_next = (n_known_B + step - 1)[:, None].expand_as(query_cols)  # above every committed group
        logits_BQV = forward(canvas, content_cols, content_valid, query_cols, query_valid, g_next)
        if step_logits is not None:
            step_logits.append(StepLogits(query_cols.masked_fill(~query_valid, -1), logits_BQV.float()))
        tokens_BQ, probs_BQV = choose_tokens(logits_BQV, cfg.temperature, cfg.top_k, cfg.top_p, generator)
        if fill_group_BN is None:
            model_BQV = scoring_probs(logits_BQV, probs_BQV, cfg)
            top_BQ = model_BQV.gather(-1, tokens_BQ[..., None])[..., 0] if cfg.temperature == 0 else None
            scores_BQ = criterion_scores(cfg.criterion, model_BQV, generator, top_BQ)
            chosen_BQ = _commit_dynamic(scores_BQ, query_valid, cfg.per_step, cfg.threshold)
            width = None if cfg.threshold is not None else min(cfg.per_step, chosen_BQ.shape[1])
            content_cols, content_valid = compact(query_cols, chosen_BQ, width)
        else:
            chosen_BQ, content_cols, content_valid = query_valid, query_cols, query_valid
        canvas.commit(query_cols, tokens_BQ, chosen_BQ, g_next, step)
        canvas.stop_at_eos(eos_ids)
    return canvas.output(eos_ids, pad_token_id, step, step_logits=step_logits)


# -- public API ------------------------------------------------------------------------------------


def _eos_ids(model: A3ForCausalLM, cfg: DecodingConfig) -> torch.Tensor | None:
    """Every id that ends a row (the config's, else the model's: Llama 3 lists several), or None."""
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else getattr(model.config.text_config, "eos_token_id", None)
    if not cfg.stop_at_eos or eos is None:
        return None
    return torch.tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long, device=model.device)


def _pad_id(model: A3ForCausalLM, cfg: DecodingConfig) -> int:
    if cfg.pad_token_id is not None:
        return cfg.pad_token_id
    pad = getattr(model.config.text_config, "pad_token_id", None)
    return 0 if pad is None else pad


def _run(model, canvas: Canvas, cfg: DecodingConfig, generator, eos_ids, output_logits,
         order_generators: Sequence[torch.Generator] | None) -> GenerationOutput:  # fmt: skip
    generator = generator if generator is not None else cfg.make_generator(model.device)
    if order_generators is not None and len(order_generators) != canvas.ids.shape[0]:
        raise ValueError(f"order_generators needs one generator per row: got {len(order_generators)} for {canvas.ids.shape[0]} rows")
    order_source = generator if order_generators is None else order_generators
    pad = _pad_id(model, cfg)
    if cfg.speculative:
        from .speculative import decode_speculative

        return decode_speculative(model, canvas, cfg, generator, eos_ids, pad, output_logits, order_source)
    blank = canvas.real & ~canvas.known
    fill_group = None if cfg.dynamic else fill_groups(blank, cfg.order, cfg.group_size, order_source)
    return _decode(model, canvas, fill_group, cfg, generator, eos_ids, pad, output_logits)


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
    prompt_real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(device).bool()
    lengths_B = prompt_real.sum(1)
    if bool((lengths_B == 0).any()):
        raise ValueError(f"empty prompt in row {int((lengths_B == 0).nonzero()[0])}: sampling needs at least one token (BOS)")
    B, N = input_ids.shape[0], int(lengths_B.max()) + length
    max_pos = max_positions(model)
    if max_pos is not None and N > max_pos:
        raise ValueError(f"prompt ({int(lengths_B.max())} tokens) + length ({length}) = {N} exceeds the model's maximum of {max_pos} positions")
    eos_ids = _eos_ids(model, cfg)

    # left-align: prompt token of rank r goes to column r, the continuation follows it
    cols = torch.arange(N, device=device)[None].expand(B, N)
    ids = torch.full((B, N), _pad_id(model, cfg), dtype=torch.long, device=device)
    rank = prompt_real.long().cumsum(1) - 1
    rows = torch.arange(B, device=device)[:, None].expand_as(rank)
    ids[rows[prompt_real], rank[prompt_real]] = input_ids[prompt_real]
    canvas = Canvas.start(ids, cols < (lengths_B + length)[:, None], cols < lengths_B[:, None], cols.contiguous())
    return _run(model, canvas, cfg, generator, eos_ids, output_logits, order_generators)


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
    **options,
) -> GenerationOutput:
    """Fill the blanks (real & ~known) of each row; known tokens (prefix, suffix) are kept.

    input_ids, known_mask, attention_mask: [B, N] (ids at blanks are ignored). Every known token comes
    first (left-to-right singletons), so the blanks see both the prefix and the suffix. Options as in
    `sample` (generator, order_generators too); a custom `order` is, per row, a permutation of that
    row's blank ranks. No EOS handling (the EOS options are ignored): each blank has the length it was
    given. Returns the canvas [B, N].
    """
    cfg = DecodingConfig.build(config, **options)
    if input_ids.dim() != 2 or known_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and known_mask must both be [B, N], got {tuple(input_ids.shape)} and {tuple(known_mask.shape)}")
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
    return _run(model, canvas, cfg, generator, None, output_logits, order_generators)


# -- text helpers (CLI) ----------------------------------------------------------------------------

_BLANK = re.compile(r"\[BLANK:(\d+)\]")


def parse_blanks(text: str) -> list[str | int]:
    """Split "The cat [BLANK:8] on the mat." into text pieces and blank lengths: ["The cat ", 8, " on the mat."]."""
    pieces: list[str | int] = []
    start = 0
    for m in _BLANK.finditer(text):
        pieces.append(text[start : m.start()])
        n = int(m.group(1))
        if n < 1:
            raise ValueError(f"blank {m.group(0)!r} must have length >= 1")
        pieces.append(n)
        start = m.end()
    pieces.append(text[start:])
    for piece in pieces:
        if isinstance(piece, str) and "[BLANK" in piece:
            bad = piece[piece.index("[BLANK") :].split("]")[0] + "]"
            raise ValueError(f"cannot parse blank spec {bad!r}: write [BLANK:n] with n the number of tokens")
    if not any(isinstance(p, int) for p in pieces):
        raise ValueError(f"no blank in {text!r}: mark the span to fill as [BLANK:n]")
    return [p for p in pieces if p != ""]


def encode_with_blanks(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize text with [BLANK:n] spans: input_ids [1, N] (the row start first, blanks hold pad ids)
    and known_mask [1, N] (False at blanks).

    One space just before a blank is dropped: "The cat [BLANK:8] on" must not encode "The cat " with
    a lone space token; in BPE vocabularies a word carries its leading space, so the blank's first
    token does ("The cat" [" sat" ...] " on"). Line breaks and tabs are text and stay.
    """
    ids, known = encode_row(tokenizer, ""), [True]
    filler = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pieces = parse_blanks(text)
    for i, piece in enumerate(pieces):
        if isinstance(piece, int):
            ids += [filler] * piece
            known += [False] * piece
            continue
        if i + 1 < len(pieces):  # a blank follows
            piece = piece.removesuffix(" ")
        toks = tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
        ids += toks
        known += [True] * len(toks)
    return torch.tensor([ids]), torch.tensor([known])


def render_fill_order(tokens: list[str], fill_step: list[int], blank: str = "_") -> str:
    """A picture of the generation: one line per step, the tokens filled so far, [new ones] bracketed.

    tokens, fill_step: one entry per real position (fill_step 0 = given, t >= 1 = filled at step t).
    """
    steps = sorted({s for s in fill_step if s >= 1})
    width = len(str(steps[-1])) if steps else 1
    lines = []
    for t in [0, *steps]:
        words = [
            f"[{tok}]" if s == t > 0 else tok if 0 <= s <= t else blank for tok, s in zip(tokens, fill_step, strict=True)
        ]
        lines.append(f"step {t:>{width}}: " + " ".join(words))
    return "\n".join(lines)


def load_pretrained(path: str) -> tuple[A3ForCausalLM, PreTrainedTokenizerBase]:
    """An A3 checkpoint directory with a tokenizer saved in it: (model in eval, tokenizer). A plain
    decoder is refused: its query vector would be random (`a3lm convert` or train it first)."""
    require_a3(path)
    return A3ForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _piece(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """One token as text for the picture: its decoded string (repr'd when it is only whitespace)."""
    if token_id >= len(tokenizer):
        return f"<{token_id}>"
    text = tokenizer.decode([token_id])
    return text.strip() or repr(text)


def _text_and_picture(tokenizer: PreTrainedTokenizerBase, out: GenerationOutput) -> tuple[str, str]:
    """The decoded text (special tokens left out) and the fill-order picture (one decoded piece per
    token, special tokens left out too; ids past the vocabulary, from a padded embedding, as <id>)."""
    real = out.attention_mask[0].bool()
    ids = out.sequences[0][real].tolist()
    steps = out.fill_step[0][real].tolist()
    special = set(tokenizer.all_special_ids)
    shown = [(i, s) for i, s in zip(ids, steps, strict=True) if i not in special]
    tokens = [_piece(tokenizer, i) for i, _ in shown]
    picture = render_fill_order(tokens, [s for _, s in shown])
    return tokenizer.decode(ids, skip_special_tokens=True), picture


DEFAULT_LENGTH = 64


def warn_unknown_words(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    """Warn when words of `text` become the unknown token (a word-level vocabulary): they are lost."""
    unk = tokenizer.unk_token_id
    if unk is None or not text:
        return
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
    if unk not in enc["input_ids"]:
        return
    spans = enc.get("offset_mapping") or []
    words = [text[a:b] for i, (a, b) in zip(enc["input_ids"], spans, strict=False) if i == unk]
    shown = ", ".join(repr(w) for w in dict.fromkeys(words)) if words else "some words"
    warnings.warn(f"not in the model's vocabulary, read as {tokenizer.unk_token}: {shown}", stacklevel=2)


def sample_text(
    model: A3ForCausalLM, tokenizer: PreTrainedTokenizerBase, prompt: str, config: DecodingConfig | None = None,
    length: int | None = None, **kwargs
) -> tuple[str, str]:
    """Continue one text prompt (keywords as in `sample`; "" = from the row start alone); returns
    (text, fill-order picture).

    length None: DEFAULT_LENGTH tokens, or fewer if the model's positions end sooner after the prompt.
    """
    warn_unknown_words(tokenizer, prompt)
    input_ids = torch.tensor([encode_row(tokenizer, prompt)])
    if length is None:
        max_pos = max_positions(model)
        room = DEFAULT_LENGTH if max_pos is None else max_pos - input_ids.shape[1]
        if room < 1:
            raise ValueError(f"the prompt ({input_ids.shape[1]} tokens) fills the model's {max_pos} positions: nothing left to sample")
        length = min(DEFAULT_LENGTH, room)
    eos_given = kwargs.get("eos_token_id") is not None or (config is not None and config.eos_token_id is not None)
    if not eos_given and tokenizer.eos_token_id is not None:  # the tokenizer's EOS, and the model's own
        model_eos = getattr(model.config.text_config, "eos_token_id", None)
        model_eos = [] if model_eos is None else [model_eos] if isinstance(model_eos, int) else list(model_eos)
        kwargs["eos_token_id"] = sorted({tokenizer.eos_token_id, *model_eos})
    return _text_and_picture(tokenizer, sample(model, input_ids, config=config, length=length, **kwargs))


def infill_text(model: A3ForCausalLM, tokenizer: PreTrainedTokenizerBase, text: str, **kwargs) -> tuple[str, str]:
    """Fill the [BLANK:n] spans of one text (keywords as in `infill`); returns (text, fill-order picture)."""
    warn_unknown_words(tokenizer, _BLANK.sub(" ", text))
    input_ids, known = encode_with_blanks(tokenizer, text)
    return _text_and_picture(tokenizer, infill(model, input_ids, known, **kwargs))


__all__ = [
    "CRITERIA",
    "DecodingConfig",
    "GenerationOutput",
    "StepLogits",
    "choose_tokens",
    "criterion_scores",
    "encode_with_blanks",
    "filter_logits",
    "infill",
    "infill_text",
    "load_pretrained",
    "parse_blanks",
    "render_fill_order",
    "sample",
    "sample_text",
]

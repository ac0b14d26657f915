"""Decoding an A3 model: group-wise AR sampling, infilling and dynamic resampling (DESIGN.md section 4).

Every mode is the same loop over a *canvas* [B, N] of known tokens and blanks:

    step t: score some unfilled positions with the query stream (they see every committed token),
            sample a token for each, commit some of them as one new group (id n_known + t - 1).

- group-wise: the blanks are split up front into groups of `group_size` in a fill order (left to
  right, right to left, random, or custom); step t scores and commits exactly group t.
- dynamic resampling: step t scores every unfilled position and commits the best `per_step` by a
  criterion (or all above a confidence `threshold`, at least one).

Known tokens (prompt, or prefix and suffix when infilling) are left-to-right singleton groups that
come before every blank, and are never changed. With `use_cache=True` each step is one forward of
[content of the group just committed ; queries of the positions to score] against an exact KV cache
(`ContentCache`); `use_cache=False` recomputes the full two-stream forward over the whole canvas every
step (the reference: same tokens, same logits up to float rounding).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .cache import ContentCache
from .groups import PAD_GROUP
from .model import A3ForCausalLM

FILL_ORDERS = ("left-to-right", "right-to-left", "random")
CRITERIA = ("confidence", "margin", "entropy", "random")


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
    step_logits: per step, the scored positions and their logits (only with output_logits=True).
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    fill_step: torch.Tensor
    group_ids: torch.Tensor
    num_steps: int
    step_logits: list[StepLogits] | None = None


@dataclass
class _Options:
    temperature: float
    top_k: int | None
    top_p: float | None
    generator: torch.Generator
    use_cache: bool
    output_logits: bool
    dynamic: bool
    criterion: str
    per_step: int
    threshold: float | None
    eos_token_id: int | None
    pad_token_id: int


# -- token choice ----------------------------------------------------------------------------------


def filter_logits(
    logits_XV: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Temperature (0 = greedy: left untouched), then top-k and top-p (nucleus) filtering; float32."""
    logits = logits_XV.float()
    if temperature > 0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p (the first always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def choose_tokens(
    logits_XV: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample (temperature > 0) or take the argmax (temperature 0) of each row.

    Returns tokens [...] and the filtered distribution probs [..., V] they were drawn from.
    """
    probs = filter_logits(logits_XV, temperature, top_k, top_p).softmax(-1)
    if temperature == 0:
        return probs.argmax(-1), probs
    flat = probs.reshape(-1, probs.shape[-1])
    tokens = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    return tokens, probs


def criterion_scores(criterion: str, probs_BQV: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Higher = commit first. confidence: max prob; margin: top-1 minus top-2 prob; entropy: minus the
    entropy; random: uniform noise. Returns [B, Q]."""
    if criterion == "confidence":
        return probs_BQV.max(-1).values
    if criterion == "margin":
        top2 = probs_BQV.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    if criterion == "entropy":
        return (probs_BQV * probs_BQV.clamp_min(1e-30).log()).sum(-1)
    if criterion == "random":
        return torch.rand(probs_BQV.shape[:-1], generator=generator, device=probs_BQV.device)
    raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")


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


# -- canvas helpers --------------------------------------------------------------------------------


def _mask_to_cols(mask_BN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns of the True entries of each row, left to right, padded: cols [B, M], valid [B, M]."""
    counts = mask_BN.sum(1)
    M = int(counts.max()) if mask_BN.numel() else 0
    cols = (~mask_BN).to(torch.int8).argsort(dim=1, stable=True)[:, :M]
    valid = torch.arange(M, device=mask_BN.device)[None] < counts[:, None]
    return cols, valid


def _blank_groups(
    blank_BN: torch.Tensor, group_size: int, order: str | torch.Tensor | list[torch.Tensor], generator: torch.Generator
) -> torch.Tensor:
    """Relative group index [B, N] of every blank (0 = filled first), -1 elsewhere.

    order: a name in FILL_ORDERS, or a custom fill order: per row a permutation of its blank ranks
    (0 = leftmost blank), or one 1-D permutation shared by every row.
    """
    B, N = blank_BN.shape
    rank = blank_BN.long().cumsum(1) - 1  # left to right
    if isinstance(order, str):
        if order == "right-to-left":
            rank = blank_BN.sum(1, keepdim=True) - 1 - rank
        elif order == "random":
            keys = torch.rand(B, N, generator=generator, device=blank_BN.device).masked_fill(~blank_BN, 2.0)
            perm = keys.argsort(dim=1)
            rank = torch.empty_like(rank).scatter_(1, perm, torch.arange(N, device=rank.device).expand(B, N))
        elif order != "left-to-right":
            raise ValueError(f"unknown order {order!r}; choose one of {', '.join(FILL_ORDERS)} or give a custom order")
    elif isinstance(order, torch.Tensor) and order.dim() == 1:  # one permutation shared by every row
        counts = blank_BN.sum(1)
        if bool((counts != order.numel()).any()) or not torch.equal(order.sort().values.cpu(), torch.arange(order.numel())):
            raise ValueError(f"a shared custom order must be a permutation of 0..{int(counts.max()) - 1} for every row")
        rank = torch.argsort(order.to(rank.device)).gather(0, rank.clamp(min=0).flatten()).view(B, N)
    else:
        if len(order) != B:
            raise ValueError(f"a custom order needs one permutation per row: got {len(order)} for {B} rows")
        rank = torch.full_like(rank, -1)
        for b, perm in enumerate(order):
            cols = blank_BN[b].nonzero().squeeze(-1)
            perm = torch.as_tensor(perm, dtype=torch.long).cpu()
            if perm.numel() != cols.numel() or not torch.equal(perm.sort().values, torch.arange(cols.numel())):
                raise ValueError(f"custom order of row {b} must be a permutation of its {cols.numel()} blank ranks")
            rank[b, cols[perm.to(cols.device)]] = torch.arange(cols.numel(), device=rank.device)
    return torch.where(blank_BN, torch.div(rank, group_size, rounding_mode="floor"), -1)


def _eos_finished(ids_BN, real_BN, known_BN, filled_BN, eos_token_id: int) -> torch.Tensor:
    """[B] bool: a generated EOS whose every earlier position is filled (what follows it is padding)."""
    N = ids_BN.shape[1]
    big = torch.full((), N, device=ids_BN.device)
    eos = filled_BN & ~known_BN & (ids_BN == eos_token_id)
    unfilled = real_BN & ~filled_BN
    first_eos = torch.where(eos.any(1), eos.int().argmax(1), big)
    first_unfilled = torch.where(unfilled.any(1), unfilled.int().argmax(1), big)
    return first_eos < first_unfilled


# -- the decoding loop -----------------------------------------------------------------------------


def _score(model, cache, ids, real, filled, group, positions, commit_BN, query_cols, g_next_B) -> torch.Tensor:
    """Logits [B, Q, V] of the query slots at query_cols, each seeing every committed token."""
    if cache is not None:
        ccols, cvalid = _mask_to_cols(commit_BN)
        return cache.step(
            ids.gather(1, ccols),
            positions.gather(1, ccols),
            group.gather(1, ccols),
            cvalid,
            positions.gather(1, query_cols),
            g_next_B[:, None].expand_as(query_cols),
        )
    # reference: the whole two-stream forward; unfilled positions join the next group, which nothing
    # that is scored can see (query slots of group g see groups < g only)
    group_ids = torch.where(filled, group, g_next_B[:, None]).masked_fill(~real, PAD_GROUP)
    logits_BNV = model(input_ids=ids, group_ids=group_ids, attention_mask=real.long(), position_ids=positions).logits
    return logits_BNV.gather(1, query_cols[..., None].expand(-1, -1, logits_BNV.shape[-1]))


@torch.no_grad()
def _decode(
    model: A3ForCausalLM,
    ids_BN: torch.Tensor,
    real_BN: torch.Tensor,
    known_BN: torch.Tensor,
    positions_BN: torch.Tensor,
    blank_group_BN: torch.Tensor | None,
    opt: _Options,
) -> GenerationOutput:
    B, N = ids_BN.shape
    ids, real, known = ids_BN.clone(), real_BN.bool(), known_BN.bool() & real_BN.bool()
    n_known_B = known.sum(1)
    if bool((n_known_B == 0).any()):
        raise ValueError(f"row {int((n_known_B == 0).nonzero()[0])} has no known token: decoding needs a prompt (at least BOS)")
    filled = known.clone()
    group = torch.where(known, known.long().cumsum(1) - 1, PAD_GROUP)
    fill_step = torch.where(known, 0, -1)
    finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
    commit_BN = known.clone()  # content the next step appends to the cache
    cache = ContentCache(model, B, ids.device) if opt.use_cache else None
    step_logits: list[StepLogits] | None = [] if opt.output_logits else None

    step = 0
    while True:
        unfilled = real & ~filled & ~finished[:, None]
        query_BN = unfilled if opt.dynamic else unfilled & (blank_group_BN == step)
        if not bool(query_BN.any()):
            break
        step += 1
        g_next_B = n_known_B + step - 1  # larger than every committed group
        query_cols, query_valid = _mask_to_cols(query_BN)
        logits_BQV = _score(model, cache, ids, real, filled, group, positions_BN, commit_BN, query_cols, g_next_B)
        if step_logits is not None:
            step_logits.append(StepLogits(query_cols.masked_fill(~query_valid, -1), logits_BQV.float()))

        tokens_BQ, probs_BQV = choose_tokens(logits_BQV, opt.temperature, opt.top_k, opt.top_p, opt.generator)
        if opt.dynamic:
            scores_BQ = criterion_scores(opt.criterion, probs_BQV, opt.generator)
            chosen_BQ = _commit_dynamic(scores_BQ, query_valid, opt.per_step, opt.threshold)
        else:
            chosen_BQ = query_valid
        rows, slots = chosen_BQ.nonzero(as_tuple=True)
        cols = query_cols[rows, slots]
        ids[rows, cols] = tokens_BQ[rows, slots]
        commit_BN = torch.zeros_like(filled)
        commit_BN[rows, cols] = True
        filled |= commit_BN
        group = torch.where(commit_BN, g_next_B[:, None], group)
        fill_step = torch.where(commit_BN, step, fill_step)
        if opt.eos_token_id is not None:
            finished |= _eos_finished(ids, real, known, filled, opt.eos_token_id)

    if opt.eos_token_id is not None:  # everything after the first generated EOS becomes padding
        eos = filled & ~known & (ids == opt.eos_token_id)
        first = torch.where(eos.any(1), eos.int().argmax(1), N)
        drop = real & ~known & (torch.arange(N, device=ids.device)[None] > first[:, None])
        drop |= real & ~filled  # left unfilled by a row that finished early (all after its EOS)
        real = real & ~drop
    ids = ids.masked_fill(~real, opt.pad_token_id)
    return GenerationOutput(
        sequences=ids,
        attention_mask=real.long(),
        fill_step=fill_step.masked_fill(~real, -1),
        group_ids=group.masked_fill(~real, PAD_GROUP),
        num_steps=step,
        step_logits=step_logits,
    )


# -- public API ------------------------------------------------------------------------------------


def _options(
    model: A3ForCausalLM,
    *,
    group_size: int,
    order: str | torch.Tensor | list[torch.Tensor],
    dynamic: bool,
    criterion: str,
    per_step: int | None,
    threshold: float | None,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    generator: torch.Generator | None,
    use_cache: bool,
    output_logits: bool,
    eos_token_id: int | None,
    pad_token_id: int | None,
) -> _Options:
    if group_size < 1:
        raise ValueError(f"group size must be >= 1, got {group_size}")
    if isinstance(order, str) and order not in FILL_ORDERS:
        raise ValueError(f"unknown order {order!r}; choose one of {', '.join(FILL_ORDERS)} or give a custom order")
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if per_step is not None and threshold is not None:
        raise ValueError("give either per_step (commit k per step) or threshold (commit all above p), not both")
    if per_step is not None and per_step < 1:
        raise ValueError(f"per_step (k) must be >= 1, got {per_step}")
    if threshold is not None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
        if criterion not in ("confidence", "margin"):
            raise ValueError(f"threshold compares a probability: use criterion confidence or margin, not {criterion!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if generator is None:
        generator = torch.Generator(device=model.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
    if pad_token_id is None:
        pad_token_id = getattr(model.config.text_config, "pad_token_id", None)
        pad_token_id = 0 if pad_token_id is None else pad_token_id
    return _Options(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
        use_cache=use_cache,
        output_logits=output_logits,
        dynamic=dynamic,
        criterion=criterion,
        per_step=per_step or 1,
        threshold=threshold,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def _max_positions(model: A3ForCausalLM) -> int | None:
    return getattr(model.config.text_config, "max_position_embeddings", None)


def _config_eos(model: A3ForCausalLM) -> int | None:
    eos = getattr(model.config.text_config, "eos_token_id", None)
    return eos[0] if isinstance(eos, list | tuple) else eos


def sample(
    model: A3ForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    length: int,
    group_size: int = 1,
    order: str | torch.Tensor | list[torch.Tensor] = "left-to-right",
    dynamic: bool = False,
    criterion: str = "confidence",
    per_step: int | None = None,
    threshold: float | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stop_at_eos: bool = True,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    use_cache: bool = True,
    output_logits: bool = False,
) -> GenerationOutput:
    """Continue each prompt by `length` tokens.

    input_ids, attention_mask: [B, L] prompts, padded on either side (1 = real token).
    Returns a canvas [B, N], N = max prompt length + length: row b holds its prompt then its
    continuation, left-aligned (position = column), padding on the right.

    Group-wise (default): the `length` positions are filled in groups of `group_size` in `order`
    (group_size 1 + left-to-right = plain AR). `order` may be a name in FILL_ORDERS or a custom fill
    order: a permutation of 0..length-1 (shared by every row, or a list with one per row).
    dynamic=True: every step scores all unfilled positions and commits the best `per_step` (default 1)
    by `criterion` (confidence, margin, entropy, random), or all with score >= `threshold`.
    temperature 0 = greedy. With stop_at_eos, a row stops once a generated EOS has every earlier
    position filled, and every position after its first generated EOS becomes padding (eos_token_id
    defaults to the model config's).
    """
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
    max_pos = _max_positions(model)
    if max_pos is not None and N > max_pos:
        raise ValueError(f"prompt ({int(lengths_B.max())} tokens) + length ({length}) = {N} exceeds the model's maximum of {max_pos} positions")
    if eos_token_id is None and stop_at_eos:
        eos_token_id = _config_eos(model)
    opt = _options(
        model, group_size=group_size, order=order, dynamic=dynamic, criterion=criterion, per_step=per_step,
        threshold=threshold, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, generator=generator,
        use_cache=use_cache, output_logits=output_logits, eos_token_id=eos_token_id if stop_at_eos else None,
        pad_token_id=pad_token_id,
    )  # fmt: skip

    # left-align: prompt token of rank r goes to column r, the continuation follows it
    cols = torch.arange(N, device=device)[None].expand(B, N)
    ids = torch.full((B, N), opt.pad_token_id, dtype=torch.long, device=device)
    rank = prompt_real.long().cumsum(1) - 1
    rows = torch.arange(B, device=device)[:, None].expand_as(rank)
    ids[rows[prompt_real], rank[prompt_real]] = input_ids[prompt_real]
    known = cols < lengths_B[:, None]
    real = cols < (lengths_B + length)[:, None]
    blank_groups = None if dynamic else _blank_groups(real & ~known, group_size, order, opt.generator)
    return _decode(model, ids, real, known, cols.contiguous(), blank_groups, opt)


def infill(
    model: A3ForCausalLM,
    input_ids: torch.Tensor,
    known_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    group_size: int = 1,
    order: str | torch.Tensor | list[torch.Tensor] = "left-to-right",
    dynamic: bool = False,
    criterion: str = "confidence",
    per_step: int | None = None,
    threshold: float | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    pad_token_id: int | None = None,
    use_cache: bool = True,
    output_logits: bool = False,
) -> GenerationOutput:
    """Fill the blanks (real & ~known) of each row; known tokens (prefix, suffix) are kept.

    input_ids, known_mask, attention_mask: [B, N] (ids at blanks are ignored). Every known token comes
    first (left-to-right singletons), so the blanks see both the prefix and the suffix. Options as in
    `sample`; a custom `order` is, per row, a permutation of that row's blank ranks. No EOS handling:
    each blank has the length it was given. Returns the same canvas [B, N].
    """
    if input_ids.dim() != 2 or known_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and known_mask must both be [B, N], got {tuple(input_ids.shape)} and {tuple(known_mask.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    real = attention_mask.bool()
    max_pos = _max_positions(model)
    if max_pos is not None and int(real.sum(1).max()) > max_pos:
        raise ValueError(f"{int(real.sum(1).max())} tokens exceed the model's maximum of {max_pos} positions")
    opt = _options(
        model, group_size=group_size, order=order, dynamic=dynamic, criterion=criterion, per_step=per_step,
        threshold=threshold, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, generator=generator,
        use_cache=use_cache, output_logits=output_logits, eos_token_id=None, pad_token_id=pad_token_id,
    )  # fmt: skip
    device = model.device
    real, known = real.to(device), known_mask.bool().to(device) & real.to(device)
    positions = (real.long().cumsum(1) - 1).clamp(min=0)  # counted over real tokens, as in the model
    blank_groups = None if dynamic else _blank_groups(real & ~known, group_size, order, opt.generator)
    return _decode(model, input_ids.to(device), real, known, positions, blank_groups, opt)


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
    """Tokenize text with [BLANK:n] spans: input_ids [1, N] (BOS first when the tokenizer has one,
    blanks hold pad ids) and known_mask [1, N] (False at blanks)."""
    ids: list[int] = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    known: list[bool] = [True] * len(ids)
    filler = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for piece in parse_blanks(text):
        if isinstance(piece, int):
            ids += [filler] * piece
            known += [False] * piece
        else:
            toks = tokenizer(piece, add_special_tokens=False)["input_ids"]
            ids += toks
            known += [True] * len(toks)
    if not any(known):
        raise ValueError("infilling needs at least one known token (a tokenizer with BOS, or text around the blanks)")
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
    """An A3 (or plain decoder) checkpoint directory with a tokenizer saved in it: (model in eval, tokenizer)."""

    return A3ForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _text_and_picture(tokenizer: PreTrainedTokenizerBase, out: GenerationOutput) -> tuple[str, str]:
    real = out.attention_mask[0].bool()
    ids = out.sequences[0][real].tolist()
    # ids past the tokenizer's vocabulary (a padded embedding matrix) have no token: show the id
    tokens = [t if t is not None else f"<{i}>" for i, t in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True)]
    picture = render_fill_order(tokens, out.fill_step[0][real].tolist())
    return tokenizer.decode(ids, skip_special_tokens=True), picture


def sample_text(model: A3ForCausalLM, tokenizer: PreTrainedTokenizerBase, prompt: str, **kwargs) -> tuple[str, str]:
    """Continue one text prompt (keywords as in `sample`); returns (text, fill-order picture)."""
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if kwargs.get("eos_token_id") is None and tokenizer.eos_token_id is not None:
        kwargs["eos_token_id"] = tokenizer.eos_token_id
    return _text_and_picture(tokenizer, sample(model, input_ids, **kwargs))


def infill_text(model: A3ForCausalLM, tokenizer: PreTrainedTokenizerBase, text: str, **kwargs) -> tuple[str, str]:
    """Fill the [BLANK:n] spans of one text (keywords as in `infill`); returns (text, fill-order picture)."""
    input_ids, known = encode_with_blanks(tokenizer, text)
    return _text_and_picture(tokenizer, infill(model, input_ids, known, **kwargs))


__all__ = [
    "CRITERIA",
    "FILL_ORDERS",
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

"""Group-wise and dynamic decoding: the loop that scores unfilled positions and commits groups."""

from __future__ import annotations

import torch

from a3lm.decoding.canvas import (
    Canvas,
    GenerationOutput,
    StepForward,
    StepHook,
    StepLogits,
    compact,
    mask_to_cols,
)
from a3lm.decoding.config import DecodingConfig
from a3lm.decoding.tokens import choose_tokens, criterion_scores, scoring_probs


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


def _next_queries(
    canvas: Canvas, schedule, step: int, stops_at_eos: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The query slots of the next step (cols [B, Q], valid [B, Q]), or None when decoding is done:
    the schedule's next group (group-wise), or every unfilled position (dynamic). Finished rows get none."""
    if schedule is None:
        query_BN = canvas.unfilled()
        return mask_to_cols(query_BN) if bool(query_BN.any()) else None
    if step == len(schedule):
        return None
    cols, valid = schedule[step]
    if not stops_at_eos:  # no row stops early (unless a step hook finished it): every step has a group
        return cols, valid & ~canvas.finished[:, None]
    if not bool(canvas.unfilled().any()):
        return None
    # a row may have nothing to fill this step (its group lies after its EOS) and more before its EOS later
    return cols, valid & ~canvas.finished[:, None] & ~canvas.after_eos.gather(1, cols)


@torch.no_grad()
def decode_groups(
    model,
    canvas: Canvas,
    fill_group_BN,
    cfg: DecodingConfig,
    generator,
    eos_ids,
    pad_token_id,
    output_logits: bool,
    on_step: StepHook | None = None,
) -> GenerationOutput:
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
        if on_step is not None:
            on_step(canvas, step, StepLogits(query_cols.masked_fill(~query_valid, -1), logits_BQV))
    return canvas.output(eos_ids, pad_token_id, step, step_logits=step_logits)

"""Lossless any-subset speculative decoding: several tokens per forward, the singleton order's joint.

Take the positions to fill in a singleton fill order j_1, j_2, ... (left to right, random, custom, the
blanks of an infilling). The query stream gives every unfilled position's distribution given the
committed tokens, q_j = p(x_j | committed), in one forward: draft the next k positions from it. Then
verify in one forward, with the drafts as singleton groups in that order: query slot m sees the
committed tokens and drafts 1..m-1, so it reads the exact sequential conditional p_m. Accept draft m
with probability min(1, p_m / q_m); at the first rejection draw that position from the normalised
residual max(0, p_m - q_m) and drop the later drafts. This is speculative sampling (Leviathan et al.;
Chen et al.), with the model drafting for itself (as in ASSD, Guo and Ermon): every committed token
follows p(x_{j_m} | x_{j_<m}) exactly, so samples follow the s = 1 distribution of the order.

One forward per round, [content ; queries] against the exact cache:
    content: the committed token not yet cached (the first draft of a window, or the residual draw)
             and the drafts 2..k, each its own group in the order;
    queries: the drafts 2..k (their p_m), and the k positions after the drafts, seeing everything:
             when every draft is accepted these are exactly the next window's q (the first of which is
             then p, so the next window's first draft is always accepted).
After a rejection the next window's q are unknown (the residual token is new): that row's next forward
carries no drafts, only the residual's content and the window's queries. The window is k positions,
or (heuristic schedule) starts at k and grows by 2 after a forward whose drafts were all accepted and
shrinks by 1 otherwise, between one draft and a row's blanks: chosen from earlier forwards only, so each
window's verification, and the samples, stay exact. Rejected drafts' cached keys
are dropped (rows of a batch accept different counts: padded slots are invalid keys). Temperature,
top-k and top-p shape q and p alike; greedy makes both one-hot, so greedy speculative decoding gives
greedy s = 1 decoding's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from a3lm.decoding.canvas import (
    Canvas,
    GenerationOutput,
    StepForward,
    StepHook,
    StepLogits,
    mask_to_cols,
    scatter_where,
)
from a3lm.decoding.config import DecodingConfig
from a3lm.decoding.tokens import draw, token_probs
from a3lm.groups import Generators, fill_groups
from a3lm.model.modeling import A3ForCausalLM


def _accept(p_BDV, q_BDV, drafts_BD, valid_BD, generator):
    """Leading accepted drafts [B, D] (bool) and the residual draw at the first rejection [B]."""
    p_d = p_BDV.gather(-1, drafts_BD[..., None]).squeeze(-1)
    q_d = q_BDV.gather(-1, drafts_BD[..., None]).squeeze(-1)
    u = torch.rand(drafts_BD.shape, generator=generator, device=drafts_BD.device)
    lead = ((u * q_d < p_d) & valid_BD).long().cumprod(1).bool()  # u < p/q, without dividing
    first_out = lead.sum(1, keepdim=True).clamp(max=drafts_BD.shape[1] - 1)  # the rejected slot (if any)
    p_r = p_BDV.gather(1, first_out[..., None].expand(-1, -1, p_BDV.shape[-1])).squeeze(1)
    q_r = q_BDV.gather(1, first_out[..., None].expand(-1, -1, q_BDV.shape[-1])).squeeze(1)
    residual = (p_r - q_r).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_r)  # p == q: never rejected
    return lead, draw(residual, generator)


class _Window:
    """The fill order as columns: rank r of row b is column cols_BM[b, r]; gathers windows of it."""

    def __init__(self, canvas: Canvas, cfg: DecodingConfig, generator: Generators):
        blank = canvas.real & ~canvas.known
        N = blank.shape[1]
        rank_BN = fill_groups(blank, cfg.order, 1, generator)  # singleton groups: the fill rank
        self.count_B = blank.sum(1)
        M = max(int(self.count_B.max()), 1)
        self.cols_BM = rank_BN.masked_fill(~blank, 2 * N).argsort(1)[:, :M]

    def at(self, start_B: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns [B, width] of ranks start..start+width-1 and whether each rank exists."""
        ranks = start_B[:, None] + torch.arange(width, device=start_B.device)
        cols = self.cols_BM.gather(1, ranks.clamp(max=self.cols_BM.shape[1] - 1))
        return cols, ranks < self.count_B[:, None]


@dataclass
class _Drafts:
    """Per row: the committed token not cached yet (pending) and D drafts (ranks start.. of the order)
    with the distributions they were drawn from (q)."""

    pending_cols: torch.Tensor  # [B, P]
    pending_valid: torch.Tensor
    cols: torch.Tensor  # [B, D]
    tokens: torch.Tensor
    valid: torch.Tensor
    q_BDV: torch.Tensor | None = None


def _verify(canvas: Canvas, forward: StepForward, d: _Drafts, p_BDV, groups_BD, done_B, step: int, generator):
    """Accept / reject the drafts against p, commit the accepted ones and the residual draw, drop the
    rejected drafts' cached keys. Returns (blanks committed per row, rejected per row, residual col)."""
    D = d.cols.shape[1]
    lead_BD = torch.zeros_like(d.valid)
    rejected_B = torch.zeros_like(done_B, dtype=torch.bool)
    residual_col = torch.zeros_like(done_B)[:, None]  # read only where a row rejected
    n_acc_B = torch.zeros_like(done_B)
    if d.q_BDV is not None and D:
        lead_BD, residual_B = _accept(p_BDV, d.q_BDV, d.tokens, d.valid, generator)
        n_acc_B = lead_BD.sum(1)
        rejected_B = n_acc_B < d.valid.sum(1)
        canvas.commit(d.cols, d.tokens, lead_BD, groups_BD, step)
        residual_col = d.cols.gather(1, n_acc_B.clamp(max=D - 1)[:, None])
        canvas.commit(
            residual_col,
            residual_B[:, None],
            rejected_B[:, None],
            groups_BD.gather(1, n_acc_B.clamp(max=D - 1)[:, None]),
            step,
        )
    if D and forward.cache is not None:  # drafts are the last D cached slots
        drop = torch.zeros_like(forward.cache.key_valid_BK)
        drop[:, -D:] = ~lead_BD
        forward.cache.drop(drop)
    return n_acc_B + rejected_B.long(), rejected_B, residual_col


@torch.no_grad()
def decode_speculative(
    model: A3ForCausalLM,
    canvas: Canvas,
    cfg: DecodingConfig,
    generator: torch.Generator,
    eos_ids: torch.Tensor | None,
    pad_token_id: int,
    output_logits: bool,
    order_generator: Generators = None,
    on_step: StepHook | None = None,
) -> GenerationOutput:
    """Speculative decoding of the canvas's blanks in the singleton order cfg.order, windows of
    k = cfg.speculative positions (adapted after each forward under the heuristic schedule).

    order_generator: what draws a random order (one generator, or one per row; default `generator`)."""
    B, N = canvas.ids.shape
    k = cfg.speculative  # the window: positions drafted per forward (its first one exact)
    window = _Window(canvas, cfg, generator if order_generator is None else order_generator)
    forward = StepForward(model, B, cfg.use_cache)
    step_logits: list[StepLogits] | None = [] if output_logits else None
    n_known_B, top = canvas.n_known, 2 * N + 1  # `top`: a query group that sees every committed token
    done_B = torch.zeros(B, dtype=torch.long, device=canvas.ids.device)  # blanks committed (by rank)
    cols, _ = window.at(done_B, 0)  # no drafts before the first forward
    d = _Drafts(
        *mask_to_cols(canvas.known), cols, torch.zeros_like(cols), torch.zeros_like(cols, dtype=torch.bool)
    )
    steps = drafted = accepted = 0
    while True:
        n_valid_B = d.valid.sum(1)
        next_cols, next_valid = window.at(done_B + n_valid_B, k)  # the window after the drafts
        next_valid &= ~canvas.finished[:, None]
        if not bool(next_valid.any() | d.valid.any()):
            break
        steps += 1
        D = d.cols.shape[1]  # drafts to verify: the previous window's, less its first position
        groups_BD = (
            n_known_B[:, None] + done_B[:, None] + torch.arange(D, device=done_B.device)
        )  # the rank in the order
        query_cols = torch.cat([d.cols, next_cols], dim=1)
        query_valid = torch.cat([d.valid, next_valid], dim=1)
        logits_BQV = forward(
            canvas,
            torch.cat([d.pending_cols, d.cols], 1),
            torch.cat([d.pending_valid, d.valid], 1),
            query_cols,
            query_valid,
            torch.cat([groups_BD, torch.full_like(next_cols, top)], dim=1),
            ids_BN=scatter_where(canvas.ids, d.cols, d.valid, d.tokens),
            group_BN=scatter_where(canvas.group, d.cols, d.valid, groups_BD),
        )
        if step_logits is not None:
            step_logits.append(StepLogits(query_cols.masked_fill(~query_valid, -1), logits_BQV.float()))
        probs_BQV = token_probs(logits_BQV, cfg)
        committed_B, rejected_B, residual_col = _verify(
            canvas, forward, d, probs_BQV[:, :D], groups_BD, done_B, steps, generator
        )
        drafted, accepted = (
            drafted + int(d.valid.sum()),
            accepted + int((committed_B - rejected_B.long()).sum()),
        )
        if cfg.speculative_schedule == "heuristic" and bool(d.valid.any()):
            # at least one draft (to keep measuring), at most a window as long as the longest row's blanks
            k = (
                max(min(cfg.speculative, 2), k - 1)
                if bool(rejected_B.any())
                else min(k + 2, window.cols_BM.shape[1])
            )
        done_B = done_B + committed_B
        canvas.stop_at_eos(eos_ids)
        d, done_B = _next_drafts(
            canvas,
            probs_BQV,
            done_B,
            rejected_B,
            residual_col,
            next_cols,
            next_valid,
            steps,
            generator,
            eos_ids,
        )
        if on_step is not None:  # every token committed this step was scored by this forward
            on_step(canvas, steps, StepLogits(query_cols.masked_fill(~query_valid, -1), logits_BQV))
    return canvas.output(
        eos_ids, pad_token_id, steps, step_logits=step_logits, drafted=drafted, accepted=accepted
    )


def _next_drafts(
    canvas, probs_BQV, done_B, rejected_B, residual_col, next_cols, next_valid, step: int, generator, eos_ids
) -> tuple[_Drafts, torch.Tensor]:
    """The next forward's pending token and drafts, drawn from this forward's window rows.

    A row that accepted every draft commits the first position of the window after them (its q is
    exact: p) and drafts the rest. A rejected row's pending token is the residual draw and it drafts
    nothing: the rows after it saw a rejected draft. (Drafting from them is exact too, any proposal
    is, but on the HMM source they were poor proposals: left to right, k = 4, the oracle's tokens per
    forward fell from 1.59 to 1.37; one forward of fresh marginals is worth more.)
    """
    K = next_cols.shape[1]
    tokens_BK = draw(probs_BQV[:, -K:], generator)
    first_ok = next_valid[:, 0] & ~rejected_B & ~canvas.finished
    canvas.commit(
        next_cols[:, :1], tokens_BK[:, :1], first_ok[:, None], (canvas.n_known + done_B)[:, None], step
    )
    done_B = done_B + first_ok.long()
    canvas.stop_at_eos(eos_ids)
    more = first_ok & ~canvas.finished
    return _Drafts(
        pending_cols=torch.where(rejected_B[:, None], residual_col, next_cols[:, :1]),
        pending_valid=(rejected_B | first_ok)[:, None],
        cols=next_cols[:, 1:],
        tokens=tokens_BK[:, 1:],
        valid=next_valid[:, 1:] & more[:, None],
        q_BDV=probs_BQV[:, -K + 1 :] if K > 1 else probs_BQV[:, :0],
    ), done_B

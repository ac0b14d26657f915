"""Exact conditionals of a hidden Markov model under any group-wise factorization.

The source (`synthetic.HMM`, or anything with float64 `start` [S], `trans` [S, S], `emit` [S, W])
generates words x_1..x_L. For a grouping `group_ids` [B, L] over those words, A3 factorizes

    P(x) = prod_k prod_{i in G_k} p(x_i | x_{G<k})

i.e. a group is predicted as a product of its tokens' *marginals* given the earlier groups. The true
value of every factor is a forward-backward pass in which the observed positions are x_{G<k} and
every other position (the group itself included) is marginalised out:

    p(x_i = w | x_O) = sum_s p(z_i = s | x_O) emit[s, w],   O = {j : group(j) < group(i)}.

Each target position i gets its own evidence set O, so we run one chain per (sample, position):
B*L chains of length L over S states, batched, in float64 with a normaliser per step. BOS/EOS are the
caller's business: in a row [BOS w_1..w_L EOS] BOS carries no information and EOS is certain
(log-prob 0), so the caller slices the word positions out and passes their group ids here.

Only the relative order of group ids matters, so ids may be any integers (the earliest group of the
words is predicted from nothing observed: its conditionals are the marginals p(x_i)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class HMMLike(Protocol):
    """start [S]: p(z_1); trans [S, S]: p(z_{t+1} | z_t); emit [S, W]: p(x_t | z_t)."""

    start: torch.Tensor
    trans: torch.Tensor
    emit: torch.Tensor


def _tables(hmm: HMMLike, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    as64 = lambda a: torch.as_tensor(a, dtype=torch.float64, device=device)  # noqa: E731
    return as64(hmm.start), as64(hmm.trans), as64(hmm.emit)


def _check(words: torch.Tensor, group_ids: torch.Tensor | None, n_words: int) -> None:
    if words.dim() != 2:
        raise ValueError(f"words must be [B, L] word indices, got shape {tuple(words.shape)}")
    if words.numel() and (words.min() < 0 or words.max() >= n_words):
        raise ValueError(
            f"word indices must be in [0, {n_words}), got range [{int(words.min())}, {int(words.max())}]"
        )
    if group_ids is not None and group_ids.shape != words.shape:
        raise ValueError(f"group_ids {tuple(group_ids.shape)} and words {tuple(words.shape)} differ in shape")


def _normalise(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p [M, S] -> (p / sum, sum); an all-zero row (impossible evidence) stays zero with sum 0."""
    total = p.sum(-1, keepdim=True)
    return p / torch.where(total > 0, total, torch.ones_like(total)), total.squeeze(-1)


def _forward_backward(
    hmm: HMMLike, words: torch.Tensor, observed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scaled forward-backward with evidence only at `observed` positions.

    words, observed [M, L] -> (post [M, L, S], log_evidence [M], emit [S, W]) where post[:, t] is
    p(z_t | x_{O minus t}): position t's own emission is left out, so it is the state posterior
    a hidden position t would have. Probability space with a normaliser per step keeps the sparse
    tables' zeros exact (no log(0) arithmetic) and avoids underflow on long chains.
    """
    start, trans, emit = _tables(hmm, words.device)
    M, L = words.shape
    # evidence likelihood per (chain, position, state): emit[s, x_t] if observed, else 1
    ev = torch.where(
        observed[..., None], emit.T[words], torch.ones((), dtype=torch.float64, device=words.device)
    )
    prior = torch.empty_like(ev)  # prior[:, t] ∝ p(z_t, x_{O, <t}), normalised per row
    beta = torch.empty_like(ev)  # beta[:, t] ∝ p(x_{O, >t} | z_t), normalised per row
    log_evidence = torch.zeros(M, dtype=torch.float64, device=words.device)
    prior[:, 0] = start
    for t in range(L):
        filtered, total = _normalise(prior[:, t] * ev[:, t])
        log_evidence += total.log()
        if t + 1 < L:
            prior[:, t + 1] = filtered @ trans
    beta[:, L - 1] = 1.0
    for t in range(L - 2, -1, -1):
        beta[:, t] = _normalise((ev[:, t + 1] * beta[:, t + 1]) @ trans.T)[0]
    post = prior * beta
    return post / post.sum(-1, keepdim=True), log_evidence, emit


def posterior_word_logprobs(hmm: HMMLike, words: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """log p(x_t = w | x_{O minus t}) for every position t and word w: [M, L, W] float64.

    words [M, L] (entries outside `observed` are ignored), observed [M, L] bool. Position t's own
    word is always left out of its evidence, so an observed position gets the predictive it would
    have were it hidden.
    """
    _check(words, observed, int(torch.as_tensor(hmm.emit).shape[-1]))
    post, _, emit = _forward_backward(hmm, words, observed)
    return (post @ emit).log()


def conditional_logprobs(
    hmm: HMMLike, words: torch.Tensor, group_ids: torch.Tensor, chunk: int = 8192
) -> torch.Tensor:
    """Exact log p(x_i | x_{j : group(j) < group(i)}) for every position: [B, L] float64.

    words [B, L] word indices; group_ids [B, L] (smaller = earlier; ties = the same group, whose
    tokens are each conditioned on the earlier groups only). `chunk` bounds the number of chains run
    at once (memory: chunk * L * S floats). A conditional whose evidence the source cannot produce
    is NaN (it is undefined); on samples of the source that never happens.
    """
    _check(words, group_ids, int(torch.as_tensor(hmm.emit).shape[-1]))
    B, L = words.shape
    # one chain per (sample b, target i): observed = positions of strictly earlier groups
    observed = (group_ids[:, None, :] < group_ids[:, :, None]).reshape(B * L, L)  # [B*L(target), L]
    chain_words = words[:, None, :].expand(B, L, L).reshape(B * L, L)
    target = torch.arange(L, device=words.device).repeat(B)  # [B*L]: which position each chain scores
    out = torch.empty(B * L, dtype=torch.float64, device=words.device)
    for lo in range(0, B * L, chunk):
        sl = slice(lo, lo + chunk)
        post, _, emit = _forward_backward(hmm, chain_words[sl], observed[sl])
        rows = torch.arange(post.shape[0], device=words.device)
        t = target[sl]
        # p(x_t | evidence) = sum_s p(z_t = s | evidence) emit[s, x_t], at the target only
        out[sl] = (post[rows, t] * emit.T[chain_words[sl][rows, t]]).sum(-1).log()
    return out.view(B, L)


def joint_logprob(hmm: HMMLike, words: torch.Tensor) -> torch.Tensor:
    """Exact log p(x_1..x_L) of each row: words [B, L] -> [B] float64 (-inf for impossible sequences)."""
    _check(words, None, int(torch.as_tensor(hmm.emit).shape[-1]))
    return _forward_backward(hmm, words, torch.ones_like(words, dtype=torch.bool))[1]


def marginal_logprob(hmm: HMMLike, words: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """Exact log p(x_O) of the observed positions only, the rest marginalised: [B] float64.

    words, observed [B, L]. With it, an infilling's log p(x_blanks | x_known) is
    joint_logprob(words) - marginal_logprob(words, known).
    """
    _check(words, observed, int(torch.as_tensor(hmm.emit).shape[-1]))
    return _forward_backward(hmm, words, observed.bool())[1]


def factorization_logprob(hmm: HMMLike, words: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """log of the product of every factor of the grouping: [B]. Equals `joint_logprob` for singleton
    groups in any order (the chain rule); with larger groups it is lower (tokens in a group are
    predicted independently, which loses their mutual information)."""
    return conditional_logprobs(hmm, words, group_ids).sum(-1)


@dataclass
class ExactNLL:
    """Mean negative log-likelihood per target token (nats) and its pieces."""

    nll: float
    total: float
    count: int


def true_nll(
    hmm: HMMLike, words: torch.Tensor, group_ids: torch.Tensor, target_mask: torch.Tensor | None = None
) -> ExactNLL:
    """The source's own NLL per token for the factorization `group_ids` over targets [B, L] (default all).

    This is the floor a perfect A3 model reaches on the same conditionals.
    """
    logp = conditional_logprobs(hmm, words, group_ids)
    mask = torch.ones_like(logp, dtype=torch.bool) if target_mask is None else target_mask.bool()
    total = float(-(logp[mask]).sum())
    count = int(mask.sum())
    return ExactNLL(nll=total / max(count, 1), total=total, count=count)

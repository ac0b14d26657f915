"""How one token is chosen: logit filtering, drawing, and the dynamic criteria's scores."""

from __future__ import annotations

import torch

from a3lm.decoding.config import CRITERIA, DecodingConfig

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


def token_probs(logits_XV: torch.Tensor, config: DecodingConfig) -> torch.Tensor:
    """The distribution [..., V] a token is drawn from: filtered softmax, or one-hot argmax when greedy."""
    logits = filter_logits(logits_XV, config.temperature, config.top_k, config.top_p)
    if config.temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return logits.softmax(-1)


def draw(probs_XV: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs [..., V] -> [...]."""
    flat = probs_XV.reshape(-1, probs_XV.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs_XV.shape[:-1])


def choose_tokens(
    logits_XV: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample (temperature > 0) or take the argmax (temperature 0) of each row.

    Returns tokens [...] and the filtered distribution probs [..., V] they were drawn from (greedy:
    the softmax of the unscaled, filtered logits).
    """
    probs = filter_logits(logits_XV, temperature, top_k, top_p).softmax(-1)
    if temperature == 0:
        return probs.max(-1).indices, probs  # the first maximum, as argmax; faster on CPU for many rows
    return draw(probs, generator), probs


def scoring_probs(logits_XV: torch.Tensor, probs_XV: torch.Tensor, config: DecodingConfig) -> torch.Tensor:
    """The distribution [..., V] dynamic criteria score: the model's own (softmax of the raw logits),
    whatever temperature, top-k and top-p the tokens are drawn with. A filtered one would not measure
    the model (with top-k = 1 every confidence is 1). probs_XV (what `choose_tokens` returned) is
    reused when no option changed it."""
    if config.top_k is None and config.top_p is None and config.temperature in (0.0, 1.0):
        return probs_XV
    return logits_XV.float().softmax(-1)


def criterion_scores(
    criterion: str,
    probs_BQV: torch.Tensor,
    generator: torch.Generator | None = None,
    top_probs_BQ: torch.Tensor | None = None,
) -> torch.Tensor:
    """Higher = commit first. confidence: max prob; margin: top-1 minus top-2 prob; entropy: minus the
    entropy; random: uniform noise. Returns [B, Q].

    top_probs_BQ: the max prob of each row when the caller has it (greedy decoding: the chosen
    token's), which spares confidence a reduction over the vocabulary.
    """
    if criterion == "confidence":
        return probs_BQV.max(-1).values if top_probs_BQ is None else top_probs_BQ
    if criterion == "margin":
        top2 = probs_BQV.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    if criterion == "entropy":
        return (probs_BQV * probs_BQV.clamp_min(1e-30).log()).sum(-1)
    if criterion == "random":
        return torch.rand(probs_BQV.shape[:-1], generator=generator, device=probs_BQV.device)
    raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")

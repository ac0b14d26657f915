"""The demo's decoding: every mode's samples from the model and from an oracle, scored under the source."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from a3lm.data import synthetic
from a3lm.decoding.api import infill, sample
from a3lm.decoding.tokens import criterion_scores
from a3lm.demo import exact
from a3lm.demo.config import DemoConfig
from a3lm.evaluation.nll import infill_middle_known
from a3lm.groups import Order, fill_groups
from a3lm.model.modeling import A3ForCausalLM

# -- decoding ----------------------------------------------------------------------------------------


@dataclass
class Generation:
    """One shown sample: its text (infilled words in [ ]) and exact log-probabilities under the source."""

    mode: str
    text: str
    exact_logprob: float  # log p(x) under the source (-inf: the source cannot produce it)
    exact_conditional: float | None = None  # infilling: log p(blanks | known)


def decoding_modes() -> list[tuple[str, dict[str, Any]]]:
    """(name, sampling kwargs) of every decoding mode shown; infilling is handled apart."""
    return [
        ("group-wise s=1 (left to right)", {"group_size": 1}),
        ("group-wise s=2 (left to right)", {"group_size": 2}),
        ("group-wise s=4 (left to right)", {"group_size": 4}),
        ("group-wise s=1 (random order)", {"group_size": 1, "order": "random"}),
        ("dynamic, confidence, 1 per step", {"dynamic": True, "criterion": "confidence", "per_step": 1}),
        ("dynamic, entropy, 1 per step", {"dynamic": True, "criterion": "entropy", "per_step": 1}),
        ("dynamic, confidence, 2 per step", {"dynamic": True, "criterion": "confidence", "per_step": 2}),
    ]


def _to_words(
    ids: torch.Tensor, token_to_word: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Word indices [B, L] of rows [BOS w.. ] and whether every token is a word (else: impossible)."""
    w = token_to_word[ids[:, 1 : length + 1].clamp(max=len(token_to_word) - 1)]
    ok = (w >= 0).all(1) & (ids[:, 1 : length + 1] < len(token_to_word)).all(1)
    return w.clamp(min=0), ok


def generate_all(
    model: A3ForCausalLM,
    hmm: synthetic.HMM,
    tokenizer: Any,
    heldout_ids: torch.Tensor,
    cfg: DemoConfig,
    on_mode: Callable[[str], None] | None = None,
) -> tuple[list[dict], list[Generation]]:
    """Sample every decoding mode; returns (statistics per mode, shown examples).

    Statistics: mean exact NLL per word of `gen_samples` samples (temperature 1) and how many the source
    could not have produced. A perfect model's ancestral samples average the source entropy.
    """
    L, n = cfg.length, cfg.gen_samples
    token_ids = torch.tensor(tokenizer.convert_tokens_to_ids(hmm.words))
    token_to_word = torch.full((len(tokenizer),), -1, dtype=torch.long)
    token_to_word[token_ids] = torch.arange(len(token_ids))
    bos = torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long)
    stats, shown = [], []

    def record(mode: str, ids: torch.Tensor, known: torch.Tensor | None = None) -> None:
        words, ok = _to_words(ids, token_to_word, L)
        joint = exact.joint_logprob(hmm, words).masked_fill(~ok, -math.inf)
        cond = None
        if known is not None:  # infilling: log p(x_blank | x_known) = log p(x) - log p(x_known)
            cond = joint - exact.marginal_logprob(hmm, words, known[:, 1 : L + 1])
        stats.append(_stat(hmm, mode, words, ok, None if known is None else known[:, 1 : L + 1]))
        blanks = L if known is None else int((~known[0, 1 : L + 1]).sum())
        texts = tokenizer.batch_decode(ids[:, 1 : L + 1])
        for b in range(min(cfg.gen_show, n)):
            text = texts[b]
            if known is not None:  # bracket the infilled words
                toks = text.split(" ")
                lo = int((~known[b, 1 : L + 1]).int().argmax())
                text = " ".join(toks[:lo] + ["[", *toks[lo : lo + blanks], "]"] + toks[lo + blanks :])
            shown.append(Generation(mode, text, float(joint[b]), None if cond is None else float(cond[b])))

    for i, (mode, kwargs) in enumerate(decoding_modes()):
        if on_mode:
            on_mode(mode)
        out = sample(model, bos, length=L, stop_at_eos=False, seed=cfg.seed + i, **kwargs)
        record(mode, out.sequences)
    for i, (mode, kwargs) in enumerate(INFILL_MODES, start=len(decoding_modes())):
        if on_mode:
            on_mode(mode)
        ids = heldout_ids[:n]
        known = infill_middle_known(ids.shape[0], L + 2, L)
        out = infill(model, ids, known, seed=cfg.seed + i, **kwargs)
        record(mode, out.sequences, known)
    return stats, shown


INFILL_MODES = (
    ("infilling middle, s=1 (left to right)", {}),
    ("infilling middle, dynamic confidence", {"dynamic": True, "criterion": "confidence"}),
)


def oracle_decode(
    hmm: synthetic.HMM,
    words: torch.Tensor,
    known: torch.Tensor,
    generator: torch.Generator,
    *,
    group_size: int = 1,
    order: Order = "left-to-right",
    dynamic: bool = False,
    criterion: str = "confidence",
    per_step: int = 1,
) -> torch.Tensor:
    """Decode like `sampling` but with the source's exact conditionals in place of the model.

    words, known [n, L] (words at blanks are ignored) -> words [n, L]. Every step draws a token at every
    blank from p(x_i | filled positions) (exact, product of marginals within a group) and commits a
    group (group-wise: the next `group_size` blanks in `order`, grouped by `groups.fill_groups` as
    `sampling` groups them; dynamic: the best `per_step` by
    `criterion`). What a perfect model would do: the floor for each mode's statistics.
    """
    words, filled = words.clone(), known.clone()
    n, L = words.shape
    group = fill_groups(~known, order, group_size, generator)
    step = 0
    while not bool(filled.all()):
        probs = exact.posterior_word_logprobs(hmm, words, filled).exp()  # [n, L, W]
        # a group of marginals can commit a combination the source cannot produce: that row's evidence is
        # impossible and its conditionals undefined (NaN); it is lost whatever follows, so fill it uniformly
        probs = torch.where(torch.isfinite(probs).all(-1, keepdim=True), probs, 1.0 / probs.shape[-1])
        tokens = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(n, L)
        if dynamic:
            scores = criterion_scores(criterion, probs.float(), generator).masked_fill(filled, -math.inf)
            k = min(per_step, int((~filled[0]).sum()))  # every row has the same number of blanks
            commit = torch.zeros_like(filled).scatter(1, scores.topk(k, dim=1).indices, True) & ~filled
        else:
            commit = (group == step) & ~filled
        words = torch.where(commit, tokens, words)
        filled |= commit
        step += 1
    return words


def oracle_stats(hmm: synthetic.HMM, held_words: torch.Tensor, cfg: DemoConfig) -> list[dict]:
    """Every decoding mode's statistics with the true conditionals instead of a model (same n, same modes)."""
    L, n = cfg.length, cfg.gen_samples
    gen = torch.Generator().manual_seed(cfg.seed)
    stats = []
    nothing = torch.zeros(n, L, dtype=torch.bool)
    for mode, kwargs in decoding_modes():
        words = oracle_decode(hmm, torch.zeros(n, L, dtype=torch.long), nothing, gen, **kwargs)
        stats.append(_stat(hmm, mode, words, torch.ones(n, dtype=torch.bool), None))
    for mode, kwargs in INFILL_MODES:
        known = infill_middle_known(n, L + 2, L)[:, 1 : L + 1]
        words = oracle_decode(hmm, held_words[:n], known, gen, **kwargs)
        stats.append(_stat(hmm, mode, words, torch.ones(n, dtype=torch.bool), known))
    return stats


def _stat(
    hmm: synthetic.HMM, mode: str, words: torch.Tensor, ok: torch.Tensor, known: torch.Tensor | None
) -> dict:
    """Exact NLL per generated word (infilling: of the blanks given the rest) of the possible samples."""
    joint = exact.joint_logprob(hmm, words).masked_fill(~ok, -math.inf)
    logp = joint if known is None else joint - exact.marginal_logprob(hmm, words, known)
    possible = torch.isfinite(joint)
    per_word = -logp[possible] / (words.shape[1] if known is None else int((~known[0]).sum()))
    return {
        "mode": mode,
        "samples": words.shape[0],
        "impossible": int((~possible).sum()),
        "nll_per_word": float(per_word.mean()) if possible.any() else math.inf,
    }

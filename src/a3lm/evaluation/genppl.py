"""Generative perplexity: sample from the A3 model, score the samples with an AR judge.

For each sampling mode (dynamic resampling that commits positions chosen at random, by confidence,
margin or lowest entropy; or "group": group-wise decoding in a fill order, which for the AR base is
its own left-to-right sampling) draw M unconditional samples of L tokens (BOS prompt), decode them
to text, re-tokenize with the judge's tokenizer and report

- judge perplexity: exp(total NLL / total tokens) of the judge (any Hugging Face causal LM) over
  all samples, each scored after the judge's BOS (or EOS when it has none);
- unigram entropy: the entropy of each sample's token-frequency distribution (A3 token ids), averaged
  over samples. Repetitive text ("the the the") has a low one, which a low perplexity can hide.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from a3lm.decoding.api import sample
from a3lm.decoding.config import CRITERIA, DecodingConfig
from a3lm.evaluation.continuations import prefix_token_id
from a3lm.evaluation.lm_eval_adapter import ar_generate, load_base_model
from a3lm.model.modeling import A3ForCausalLM

GENPPL_MODES = ("group", *CRITERIA)  # group-wise decoding, or dynamic resampling by a criterion
DEFAULT_MODES = ("random", "confidence", "entropy")


def load_judge(path: str, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Any]:
    """An AR judge (eval mode, its checkpoint's dtype) and its tokenizer: a folder, a .gguf file,
    'smollm2' or a Hub id, as for the base row."""
    return load_base_model(path, str(device))


def unigram_entropy(tokens: Sequence[int]) -> float:
    """Entropy (nats) of the empirical token distribution of one sample."""
    if not tokens:
        return 0.0
    counts = torch.tensor(list(Counter(tokens).values()), dtype=torch.float64)
    p = counts / counts.sum()
    return float(-(p * p.log()).sum())


@torch.no_grad()
def judge_nll(
    judge: torch.nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 8
) -> tuple[float, int]:
    """(total NLL in nats, number of scored tokens) of texts under the judge, each text after BOS.

    Texts longer than the judge's max_position_embeddings are cut to fit.
    """
    per_text = judge_nll_per_text(judge, tokenizer, texts, batch_size)
    return sum(nll for nll, _ in per_text), sum(n for _, n in per_text)


@torch.no_grad()
def judge_nll_per_text(
    judge: torch.nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 8
) -> list[tuple[float, int]]:
    """(NLL in nats, scored tokens) of each text under the judge, after BOS (cut to the judge's length)."""
    start = prefix_token_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    max_len = getattr(judge.config, "max_position_embeddings", None)
    encoded = [[start, *tokenizer.encode(t, add_special_tokens=False)][:max_len] for t in texts]
    out = []
    for i in range(0, len(encoded), batch_size):
        batch = encoded[i : i + batch_size]
        N = max(map(len, batch))
        ids = torch.full((len(batch), N), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, row in enumerate(batch):
            ids[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = 1
        ids, mask = ids.to(judge.device), mask.to(judge.device)
        logits = judge(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll_BN = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
        out += [(float(nll), int(n)) for nll, n in zip(nll_BN.sum(1), (targets != -100).sum(1), strict=True)]
    return out


def judge_perplexity(judge: torch.nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 8) -> float:
    """exp(mean NLL per token) of the judge over all texts (token-weighted)."""
    total, count = judge_nll(judge, tokenizer, texts, batch_size)
    if count == 0:
        raise ValueError("no token to score: every text is empty")
    return math.exp(total / count)


def generate_samples(
    model: A3ForCausalLM | torch.nn.Module,
    tokenizer,
    config: DecodingConfig,
    num_samples: int,
    length: int,
    batch_size: int = 16,
    seed: int = 1234,
    progress: bool = True,
) -> list[list[int]]:
    """num_samples unconditional samples of `length` tokens (BOS prompt, no EOS stop), decoded as
    `config` says. A plain causal LM (the AR base) samples left to right with config's temperature,
    top-k and top-p."""
    is_a3 = isinstance(model, A3ForCausalLM)
    if not is_a3 and (config.mode, config.order, config.group_size) != ("group", "left-to-right", 1):
        raise ValueError(
            f"the AR base model samples left to right only (genppl mode group), not in {config.mode} mode"
        )
    generator = torch.Generator(device=model.device).manual_seed(seed)
    samples = []
    for start in tqdm(
        range(0, num_samples, batch_size), desc=f"genppl samples ({config.mode})", disable=not progress
    ):
        B = min(batch_size, num_samples - start)
        prompt = torch.full((B, 1), prefix_token_id(tokenizer), dtype=torch.long, device=model.device)
        if not is_a3:
            samples += ar_generate(
                model,
                prompt,
                torch.ones_like(prompt),
                length,
                config.temperature,
                config.top_k,
                config.top_p,
                pad_token_id=tokenizer.pad_token_id or 0,
                seed=seed + start,
                stop_at_eos=False,
            )
            continue
        out = sample(model, prompt, length=length, config=config, generator=generator, stop_at_eos=False)
        samples += out.sequences[:, 1:].tolist()
    return samples


def mode_config(
    mode: str, group: DecodingConfig, dynamic: DecodingConfig, temperature: float
) -> DecodingConfig:
    """The config of one genppl mode: "group" is `group`, a criterion is `dynamic` with that criterion;
    both at the genppl temperature."""
    if mode not in GENPPL_MODES:
        raise ValueError(
            f"unknown generative-perplexity mode {mode!r}; choose from {', '.join(GENPPL_MODES)}"
        )
    if mode == "group":
        return DecodingConfig.build(group, temperature=temperature)
    return DecodingConfig.build(dynamic, criterion=mode, temperature=temperature)


def evaluate_genppl(
    model: A3ForCausalLM | torch.nn.Module,
    tokenizer,
    judge: torch.nn.Module,
    judge_tokenizer,
    configs: dict[str, DecodingConfig],
    num_samples: int = 16,
    length: int = 128,
    batch_size: int = 16,
    seed: int = 1234,
    progress: bool = True,
) -> tuple[dict[str, dict[str, float]], dict[str, list[dict[str, Any]]]]:
    """For each mode's config (see mode_config): ({mode: {"gen_ppl": judge perplexity,
    "unigram_entropy": mean entropy}}, {mode: one record per sample: its text, judge NLL, scored
    tokens, perplexity and unigram entropy})."""
    results, records = {}, {}
    for mode, config in configs.items():
        samples = generate_samples(model, tokenizer, config, num_samples, length, batch_size, seed, progress)
        texts = [tokenizer.decode(s, skip_special_tokens=True) for s in samples]
        nlls = judge_nll_per_text(judge, judge_tokenizer, texts, batch_size)
        total, count = sum(n for n, _ in nlls), sum(c for _, c in nlls)
        if count == 0:
            raise ValueError("no token to score: every text is empty")
        entropies = [unigram_entropy(s) for s in samples]
        results[mode] = {"gen_ppl": math.exp(total / count), "unigram_entropy": sum(entropies) / len(samples)}
        records[mode] = [
            {
                "prompt": "",
                "text": text,
                "judge_nll": nll,
                "judge_tokens": n,
                "judge_ppl": math.exp(nll / n) if n else None,
                "unigram_entropy": h,
            }
            for text, (nll, n), h in zip(texts, nlls, entropies, strict=True)
        ]
    return results, records

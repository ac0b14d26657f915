"""Generative perplexity: sample from the A3 model, score the samples with an AR judge.

For each sampling mode (dynamic resampling that commits `per_step` positions per step chosen at
random, by confidence or by lowest entropy; DESIGN.md section 4) draw M unconditional samples of L
tokens (BOS prompt), decode them to text, re-tokenize with the judge's tokenizer and report

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
from transformers import AutoModelForCausalLM, AutoTokenizer

from .. import sampling
from ..model import A3ForCausalLM
from .likelihood import prefix_token_id

GENPPL_MODES = ("random", "confidence", "entropy")


def load_judge(path: str, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Any]:
    """An AR judge (AutoModelForCausalLM, eval mode, fp32 on CPU) and its tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def unigram_entropy(tokens: Sequence[int]) -> float:
    """Entropy (nats) of the empirical token distribution of one sample."""
    if not tokens:
        return 0.0
    counts = torch.tensor(list(Counter(tokens).values()), dtype=torch.float64)
    p = counts / counts.sum()
    return float(-(p * p.log()).sum())


@torch.no_grad()
def judge_nll(judge: torch.nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 8) -> tuple[float, int]:
    """(total NLL in nats, number of scored tokens) of texts under the judge, each text after BOS.

    Texts longer than the judge's max_position_embeddings are cut to fit.
    """
    start = prefix_token_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    max_len = getattr(judge.config, "max_position_embeddings", None)
    encoded = [[start, *tokenizer.encode(t, add_special_tokens=False)][:max_len] for t in texts]
    total, count = 0.0, 0
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
        total += float(F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum"))
        count += int((targets != -100).sum())
    return total, count


def judge_perplexity(judge: torch.nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 8) -> float:
    """exp(mean NLL per token) of the judge over all texts (token-weighted)."""
    total, count = judge_nll(judge, tokenizer, texts, batch_size)
    if count == 0:
        raise ValueError("no token to score: every text is empty")
    return math.exp(total / count)


def generate_samples(
    model: A3ForCausalLM,
    tokenizer,
    mode: str,
    num_samples: int,
    length: int,
    per_step: int = 1,
    temperature: float = 1.0,
    batch_size: int = 16,
    seed: int = 1234,
    progress: bool = True,
) -> list[list[int]]:
    """num_samples unconditional samples of `length` tokens (BOS prompt, no EOS stop) in dynamic `mode`."""
    if mode not in GENPPL_MODES:
        raise ValueError(f"unknown generative-perplexity mode {mode!r}; choose one of {', '.join(GENPPL_MODES)}")
    generator = torch.Generator(device=model.device).manual_seed(seed)
    samples = []
    for start in tqdm(range(0, num_samples, batch_size), desc=f"genppl samples ({mode})", disable=not progress):
        B = min(batch_size, num_samples - start)
        prompt = torch.full((B, 1), prefix_token_id(tokenizer), dtype=torch.long, device=model.device)
        out = sampling.sample(
            model,
            prompt,
            length=length,
            dynamic=True,
            criterion=mode,
            per_step=per_step,
            temperature=temperature,
            generator=generator,
            stop_at_eos=False,
        )
        samples += out.sequences[:, 1:].tolist()
    return samples


def evaluate_genppl(
    model: A3ForCausalLM,
    tokenizer,
    judge: torch.nn.Module,
    judge_tokenizer,
    modes: Sequence[str] = GENPPL_MODES,
    num_samples: int = 16,
    length: int = 128,
    per_step: int = 1,
    temperature: float = 1.0,
    batch_size: int = 16,
    seed: int = 1234,
    progress: bool = True,
) -> tuple[dict[str, dict[str, float]], dict[str, list[str]]]:
    """({mode: {"gen_ppl": judge perplexity, "unigram_entropy": mean entropy}}, {mode: sample texts})."""
    results, samples_text = {}, {}
    for mode in modes:
        samples = generate_samples(model, tokenizer, mode, num_samples, length, per_step, temperature, batch_size, seed, progress)
        texts = [tokenizer.decode(s, skip_special_tokens=True) for s in samples]
        results[mode] = {
            "gen_ppl": judge_perplexity(judge, judge_tokenizer, texts, batch_size),
            "unigram_entropy": sum(map(unigram_entropy, samples)) / len(samples),
        }
        samples_text[mode] = texts
    return results, samples_text

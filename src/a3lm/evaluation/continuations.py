"""log p(continuation | context) for many (context, continuation) pairs, batched.

The context is a run of left-to-right singleton groups with BOS first (as the model saw prompts in
curriculum stage 1); the continuation comes after every context token, its tokens in a chosen order
and group size: `groups.infill_groups` with the context known, as infilling and decoding group. The
result is exact for that factorization: different orders are different (valid) models of the same
text, so `order` is part of every reported number.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from a3lm.groups import PAD_GROUP, check_order, infill_groups
from a3lm.model.likelihood import target_logprobs
from a3lm.model.modeling import A3ForCausalLM, max_positions
from a3lm.tokenizer import row_start_id


@dataclass
class ContinuationScore:
    """logprob: sum of log p over the continuation tokens; is_greedy: every continuation token is the
    argmax of its row (given the earlier groups); num_tokens: continuation length after truncation."""

    logprob: float
    is_greedy: bool
    num_tokens: int


def _seeded(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))


def request_generator(seed: int, context: Sequence[int], continuation: Sequence[int]) -> torch.Generator:
    """A generator seeded by (seed, tokens): a random order depends on the request, not on its batch."""
    return _seeded(seed, f"{list(context)}|{list(continuation)}")


def generation_generator(seed: int, given: Sequence[int], n_new: int) -> torch.Generator:
    """A generator seeded by (seed, a row's given tokens, how many it generates), for the `order_generators`
    of `sampling.sample` / `infill`: a random fill order depends on the request, not on its batch."""
    return _seeded(seed, f"{list(given)}|{n_new}")


def _truncate(context: list[int], continuation: list[int], max_length: int | None) -> list[int]:
    """Drop context tokens from the left (BOS kept) until context + continuation fit in max_length."""
    if max_length is None or len(context) + len(continuation) <= max_length:
        return context
    keep = max_length - len(continuation) - 1
    if keep < 0:
        raise ValueError(
            f"continuation of {len(continuation)} tokens does not fit the model's {max_length} "
            "positions with BOS"
        )
    return context[:1] + (context[-keep:] if keep else [])


def score_continuations(
    model: A3ForCausalLM | PreTrainedModel,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    order: str = "left-to-right",
    group_size: int = 1,
    batch_size: int = 16,
    seed: int = 0,
    max_length: int | None = None,
    pad_token_id: int = 0,
    progress: bool = False,
) -> list[ContinuationScore]:
    """Score token-level (context_ids, continuation_ids) pairs; context_ids must start with BOS.

    `model` is an A3 model (scored under `order`, `group_size`) or a plain causal LM (the AR base:
    left to right only), through the same batching, truncation and BOS convention.

    Each batch is one padded forward [B, N] (right padding; positions count real tokens). Requests are
    sorted longest first so that a batch holds similar lengths, and returned in the input order.
    max_length defaults to the model's max_position_embeddings; longer contexts lose tokens after BOS.
    """
    check_order(order, named=True)
    if max_length is None:
        max_length = max_positions(model)
    if not isinstance(model, A3ForCausalLM) and (order, group_size) != ("left-to-right", 1):
        raise ValueError(
            "a plain AR model scores left to right one token at a time, "
            f"not {order} with groups of {group_size}"
        )
    prepared = [_prepare(context, continuation, max_length) for context, continuation in requests]
    by_length = sorted(range(len(prepared)), key=lambda i: -sum(map(len, prepared[i])))
    results: list[ContinuationScore | None] = [None] * len(prepared)
    batches = [by_length[i : i + batch_size] for i in range(0, len(by_length), batch_size)]
    for batch in tqdm(batches, desc=f"loglikelihood ({order}, s={group_size})", disable=not progress):
        # a random order is drawn per request from its own tokens: it depends on the request, not its batch
        generators = [
            request_generator(seed, requests[i][0], prepared[i][1]) if order.startswith("random") else None
            for i in batch
        ]
        rows = _batch([prepared[i] for i in batch], order, group_size, generators, pad_token_id)
        for i, score in zip(batch, _score_batch(model, *rows), strict=True):
            results[i] = score
    return results  # type: ignore[return-value]


def _prepare(
    context: Sequence[int], continuation: Sequence[int], max_length: int | None
) -> tuple[list[int], list[int]]:
    context, continuation = list(context), list(continuation)
    if not context:
        raise ValueError("empty context: the context needs at least BOS (the first group is context only)")
    if not continuation:
        raise ValueError("empty continuation: nothing to score")
    return _truncate(context, continuation, max_length), continuation


def _batch(
    pairs: list[tuple[list[int], list[int]]],
    order: str,
    group_size: int,
    generators: list[torch.Generator | None],
    pad_token_id: int,
) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask, group_ids, targets) [B, N], right-padded: each row's context known
    first (left-to-right singletons, BOS the earliest), then its continuation in `order`."""
    B, N = len(pairs), max(len(c) + len(x) for c, x in pairs)
    input_ids = torch.full((B, N), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, N), dtype=torch.long)
    group_ids = torch.full((B, N), PAD_GROUP, dtype=torch.long)
    targets = torch.zeros((B, N), dtype=torch.bool)
    for b, ((context, continuation), gen) in enumerate(zip(pairs, generators, strict=True)):
        C, L = len(context), len(continuation)
        input_ids[b, : C + L] = torch.tensor(context + continuation)
        attention_mask[b, : C + L] = 1
        # grouped over the request's own length, so that padding never changes its order
        known = torch.arange(C + L)[None] < C
        group_ids[b, : C + L] = infill_groups(known, size=group_size, order=order, generator=gen)[0]
        targets[b, C : C + L] = True
    return input_ids, attention_mask, group_ids, targets


def _score_batch(
    model: A3ForCausalLM | PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    group_ids: torch.Tensor,
    targets: torch.Tensor,
) -> list[ContinuationScore]:
    """One padded forward: each row's summed log p of its targets, and whether greedy decoding gives them."""
    device = model.device
    input_ids, attention_mask, targets = input_ids.to(device), attention_mask.to(device), targets.to(device)
    logits_BNV = token_logits(model, input_ids, group_ids.to(device), attention_mask)
    logp_T, greedy_T = target_logprobs(logits_BNV, input_ids, targets)
    B, row_T = input_ids.shape[0], targets.nonzero()[:, 0]
    logp_B = torch.zeros(B, device=device).index_add_(0, row_T, logp_T)
    misses_B = torch.zeros(B, dtype=torch.long, device=device).index_add_(0, row_T, (~greedy_T).long())
    n_B = targets.sum(1)
    return [ContinuationScore(float(logp_B[b]), bool(misses_B[b] == 0), int(n_B[b])) for b in range(B)]


@torch.no_grad()
def token_logits(
    model, input_ids: torch.Tensor, group_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """[B, N, V] logits whose row i is the distribution of token i (BOS's row is never a target).

    An A3 model's query stream is that already (under group_ids). A plain causal LM (the AR base) is
    scored left to right as lm-eval's `hf` model scores it: its row i - 1 predicts token i, so its
    logits move one row down; group_ids play no part.
    """
    if isinstance(model, A3ForCausalLM):
        return model(input_ids=input_ids, group_ids=group_ids, attention_mask=attention_mask).logits
    logits_BNV = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return torch.cat([torch.zeros_like(logits_BNV[:, :1]), logits_BNV[:, :-1]], dim=1)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (BOS + context, continuation) as lm-eval splits them.

    Trailing spaces of the context move to the continuation, and the continuation's ids are those of
    the whole string after the context's ids (so tokenization across the boundary is the whole text's).
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False) if context else []
    return [prefix_token_id(tokenizer), *context_ids], whole[len(context_ids) :]


def prefix_token_id(tokenizer) -> int:
    """The token every context starts with: the row start of training rows (`tokenizer.row_start_id`)."""
    return row_start_id(tokenizer)


def loglikelihood(
    model: A3ForCausalLM,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    order: str = "left-to-right",
    group_size: int = 1,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> list[ContinuationScore]:
    """log p(continuation | context) of string pairs, under `order` with groups of `group_size`."""
    requests = [encode_pair(tokenizer, context, continuation) for context, continuation in pairs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return score_continuations(
        model, requests, order, group_size, batch_size, seed, pad_token_id=pad, progress=progress
    )

"""Log-probabilities of targets under any grouping, in one forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from a3lm.groups import predictable, validate_group_ids
from a3lm.model.modeling import A3ForCausalLM


@dataclass
class LogProbs:
    """token [B, N]: log p(x_i | x_{groups < group(i)}) at targets, 0 elsewhere; total [B]; count [B]."""

    token: torch.Tensor
    total: torch.Tensor
    count: torch.Tensor
    targets: torch.Tensor


@torch.no_grad()
def sequence_logprobs(
    model: A3ForCausalLM,
    input_ids: torch.Tensor,
    group_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> LogProbs:
    """log p(x_targets | x_context) under the factorization `group_ids` (exact for that order).

    target_mask [B, N] bool: positions to score; default every predictable real token. Asking for a
    position that is not predictable (earliest group, padding) raises. position_ids [B, N]: default
    counted over real tokens; give them where a row has holes that still take a position.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if target_mask is None:
        target_mask = predictable(group_ids, attention_mask)
    validate_group_ids(group_ids, attention_mask, input_ids=input_ids, targets=target_mask)
    logits_BNV = model(
        input_ids=input_ids, group_ids=group_ids, attention_mask=attention_mask, position_ids=position_ids
    ).logits
    logp_T, _ = target_logprobs(logits_BNV, input_ids, target_mask)
    token = torch.zeros(input_ids.shape, dtype=logp_T.dtype, device=logp_T.device)
    token[target_mask] = logp_T
    return LogProbs(token=token, total=token.sum(-1), count=target_mask.sum(-1), targets=target_mask)


def target_logprobs(
    logits_BNV: torch.Tensor, input_ids_BN: torch.Tensor, targets_BN: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p of each target token [T] and whether it is the argmax [T], targets in row-major order.

    The softmax runs over the target rows only: [T, V] instead of [B, N, V] in fp32 (V can be 128k).
    """
    logits_TV = logits_BNV[targets_BN].float()
    tokens_T = input_ids_BN[targets_BN]
    logp_T = torch.log_softmax(logits_TV, dim=-1).gather(-1, tokens_T[:, None]).squeeze(-1)
    return logp_T, logits_TV.argmax(-1) == tokens_T

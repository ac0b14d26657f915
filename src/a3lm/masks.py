"""Two-stream attention masks from group ids.

Every query (a content or a query-stream slot) attends to *content* keys only; no token ever attends
to a query-stream slot, so the key axis is the content half alone: [B, 1, Q, K] with K = N (training)
or K = cached + new content (inference).

    content slot of group k: keys of groups <= k   (bidirectional inside a group)
    query slot of group k:   keys of groups <  k   (never its own group, never itself)
"""

from __future__ import annotations

import torch


def group_attention_mask(
    query_groups_BQ: torch.Tensor,
    query_strict_BQ: torch.Tensor,
    key_groups_BK: torch.Tensor,
    key_valid_BK: torch.Tensor,
) -> torch.Tensor:
    """Boolean mask [B, 1, Q, K] (True = attend).

    query_strict_BQ: True for query-stream slots (strictly earlier groups), False for content slots.
    Rows with no visible key (padding, the earliest group's query slots) are opened to every key:
    SDPA would return NaN there, and those rows feed nothing (they are never keys and never targets).
    """
    kg = key_groups_BK[:, None, :]
    qg = query_groups_BQ[:, :, None]
    allowed = (kg < qg) | (~query_strict_BQ[:, :, None] & (kg == qg))
    allowed = allowed & key_valid_BK[:, None, :].bool()
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return allowed[:, None]


def two_stream_mask(group_ids_BN: torch.Tensor, attention_mask_BN: torch.Tensor) -> torch.Tensor:
    """Mask [B, 1, 2N, N] for the concatenated [content ; query] streams over content keys."""
    strict = torch.zeros_like(group_ids_BN, dtype=torch.bool)
    query_groups = torch.cat([group_ids_BN, group_ids_BN], dim=1)
    query_strict = torch.cat([strict, ~strict], dim=1)
    return group_attention_mask(query_groups, query_strict, group_ids_BN, attention_mask_BN)

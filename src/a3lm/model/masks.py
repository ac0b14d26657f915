"""Two-stream attention masks from group ids.

Every query (a content or a query-stream slot) attends to *content* keys only; no token ever attends
to a query-stream slot, so the key axis is the content half alone: [B, 1, Q, K] with K = N (training)
or K = cached + new content (inference).

    content slot of group k: keys of groups <= k   (bidirectional inside a group)
    query slot of group k:   keys of groups <  k   (never its own group, never itself)
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask


def group_attention_mask(
    query_groups_BQ: torch.Tensor,
    query_strict_BQ: torch.Tensor,
    key_groups_BK: torch.Tensor,
    key_valid_BK: torch.Tensor,
) -> torch.Tensor:
    """Boolean mask [B, 1, Q, K] (True = attend).

    query_strict_BQ: True for query-stream slots (strictly earlier groups), False for content slots.
    Rows with no visible key (padding, the earliest group's query slots) are opened to the first key
    alone: SDPA would return NaN there, and those rows feed nothing (they are never keys and never
    targets). One key rather than all keeps such a row's key prefix short (`row_chunks`).
    """
    kg = key_groups_BK[:, None, :]
    qg = query_groups_BQ[:, :, None]
    allowed = (kg < qg) | (~query_strict_BQ[:, :, None] & (kg == qg))
    allowed = allowed & key_valid_BK[:, None, :].bool()
    allowed[..., :1] |= ~allowed.any(dim=-1, keepdim=True)
    return allowed[:, None]


def windowed_mask(
    mask_B1QK: torch.Tensor,
    query_positions_BQ: torch.Tensor,
    key_positions_BK: torch.Tensor,
    window: int,
    has_own_slot_BQ: torch.Tensor,
) -> torch.Tensor:
    """A group mask [B, 1, Q, K] cut to the keys within a sliding window: |pos_q - pos_k| < window.

    Under left-to-right singletons every visible key lies at or left of its query, so this is the
    base model's own window (pos_q - pos_k < window). In other orders a query also sees keys to its
    right (tokens of earlier groups): the window is symmetric so that a windowed layer still only
    relates tokens at distances its pretraining saw (|i - j| < window), on either side. A row left
    with no key and no own slot (a query slot whose earlier-group keys all lie outside the window,
    without `query_self_attention`) keeps its unwindowed keys: attention over nothing is undefined,
    and those keys leak nothing (the group rule allows them).
    """
    distance_BQK = (query_positions_BQ[:, :, None] - key_positions_BK[:, None, :]).abs()
    inside = mask_B1QK & (distance_BQK < window)[:, None]
    blind = ~inside.any(dim=-1, keepdim=True) & ~has_own_slot_BQ[:, None, :, None]
    return torch.where(blind, mask_B1QK, inside)


def row_chunks(mask_B1RK: torch.Tensor, rows: int) -> list[tuple[int, int, int]]:
    """(start row, end row, n_keys) for each chunk of `rows` rows: no row of the chunk sees a key at or
    after n_keys, in any sample. Over group-sorted positions (`sort_by_group`) every row sees a key
    prefix, so attention by chunks, each over its own prefix, skips about half the [R, K] products,
    as a causal kernel does. One host sync."""
    R, K = mask_B1RK.shape[-2:]
    seen_RK = mask_B1RK[:, 0].any(dim=0)
    ends_R = K - seen_RK.flip(-1).to(torch.uint8).argmax(dim=-1)  # one past each row's last seen key
    ends = torch.nn.functional.pad(ends_R, (0, -R % rows)).view(-1, rows).amax(-1).tolist()
    return [
        (start, min(start + rows, R), n_keys) for start, n_keys in zip(range(0, R, rows), ends, strict=True)
    ]


def own_slot_mask(n_content: int, n_query: int, device: torch.device | None = None) -> torch.Tensor:
    """[1, 1, C + Q, Q] bool: the keys of Q query-stream slots, each seen by its own row alone (the
    diagonal of the query rows; content rows see none). Appended to a content mask, it lets one
    attention call cover the own-slot rule (decoding steps, where Q is small)."""
    rows = torch.arange(n_content + n_query, device=device)[:, None]
    return (rows - n_content == torch.arange(n_query, device=device))[None, None]


def two_stream_mask(group_ids_BN: torch.Tensor, attention_mask_BN: torch.Tensor) -> torch.Tensor:
    """Mask [B, 1, 2N, N] for the concatenated [content ; query] streams over content keys."""
    strict = torch.zeros_like(group_ids_BN, dtype=torch.bool)
    query_groups = torch.cat([group_ids_BN, group_ids_BN], dim=1)
    query_strict = torch.cat([strict, ~strict], dim=1)
    return group_attention_mask(query_groups, query_strict, group_ids_BN, attention_mask_BN)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = attend) as the additive 0 / -inf bias fused attention kernels take, in `dtype`.

    An additive mask passes through (cast to `dtype`). Build it once per forward: every layer shares it.
    """
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def sort_by_group(group_ids_BN: torch.Tensor, attention_mask_BN: torch.Tensor) -> torch.Tensor:
    """Permutation [B, N] putting real tokens in (group, position) order and padding last.

    RoPE carries the true positions, so attending in this order is exact; it makes the two-stream
    mask block-triangular, so FlexAttention skips whole tiles.
    """
    B, N = group_ids_BN.shape
    pos = torch.arange(N, device=group_ids_BN.device).expand(B, N)
    real = attention_mask_BN.bool()
    key = torch.where(real, group_ids_BN * N + pos, torch.iinfo(torch.long).max // 2 + pos)
    return key.argsort(dim=1)


class BlockMaskCache:
    """The FlexAttention BlockMasks of the last few shared groupings, owned by whoever builds them (a model).

    Stages 1-2 and fixed-order scoring give every sample of every step the same grouping, so its
    BlockMask (`create_block_mask` evaluates the mask over the whole [2N, K] grid) is built once and
    reused. Entries match on the grouping's values, device, block size and own-slot rule; the oldest is
    dropped past `capacity`.
    """

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self._entries: list[tuple[torch.Tensor, bool, int, BlockMask]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, group_ids_N: torch.Tensor, query_self: bool, block_size: int) -> BlockMask | None:
        """The BlockMask built for this one-row grouping [N], or None."""
        for groups_N, self_slot, size, mask in self._entries:
            same_kind = (self_slot, size, groups_N.device, groups_N.shape) == (
                query_self,
                block_size,
                group_ids_N.device,
                group_ids_N.shape,
            )
            if same_kind and torch.equal(groups_N, group_ids_N):
                return mask
        return None

    def put(self, group_ids_N: torch.Tensor, query_self: bool, block_size: int, mask: BlockMask) -> None:
        """Remember `mask` as the BlockMask of the one-row grouping [N]."""
        if len(self._entries) >= self.capacity:
            self._entries.pop(0)
        self._entries.append((group_ids_N.clone(), query_self, block_size, mask))


def flex_two_stream_block_mask(
    group_ids_BN: torch.Tensor,
    attention_mask_BN: torch.Tensor,
    query_self: bool = True,
    block_size: int = 128,
    cache: BlockMaskCache | None = None,
) -> BlockMask:
    """FlexAttention BlockMask over [content ; query] queries (2N) and keys: content (N), plus the
    query slots (N) when `query_self` (each query-stream slot sees its own slot: the diagonal).

    When every sample shares one grouping and has no padding (stages 1-2, fixed-order scoring), one
    mask broadcast over the batch is built, and with a `cache` reused across calls.
    """
    B, N = group_ids_BN.shape
    valid = attention_mask_BN.bool()
    shared = bool(valid.all()) and bool((group_ids_BN == group_ids_BN[:1]).all())
    if shared:
        if cache is not None and (mask := cache.get(group_ids_BN[0], query_self, block_size)) is not None:
            return mask
        group_ids_BN, valid = group_ids_BN[:1], valid[:1]

    def mask_mod(b, h, q_idx, kv_idx):
        if shared:  # one row of ids for the whole batch: the kernel still asks with each sample's index
            b = b * 0
        strict = q_idx >= N  # query-stream slots: strictly earlier groups
        content_kv = kv_idx < N
        kv = torch.where(content_kv, kv_idx, 0)
        q_group = group_ids_BN[b, torch.where(strict, q_idx - N, q_idx)]
        kv_group = group_ids_BN[b, kv]
        earlier = valid[b, kv] & ((kv_group < q_group) | (~strict & (kv_group == q_group)))
        return (content_kv & earlier) | (strict & (kv_idx == q_idx))

    n_keys = 2 * N if query_self else N
    mask = create_block_mask(
        mask_mod,
        None if shared else B,
        None,
        2 * N,
        n_keys,
        device=group_ids_BN.device,
        BLOCK_SIZE=block_size,
    )
    if shared and cache is not None:
        cache.put(group_ids_BN[0], query_self, block_size, mask)
    return mask

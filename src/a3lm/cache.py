"""Exact content-stream KV cache for A3 decoding.

The content K/V of a position in group k depend only on groups <= k, so once a group is committed and
every later group comes after it, its K/V never change: caching them is exact, not an approximation.

The cache is state only: `A3ForCausalLM.decode_step(cache, ...)` runs the forward that appends to it
(one forward path with the training forward). Rows of a batch may commit different numbers of tokens
in a step: padded content slots stay as invalid keys (never attended), and `drop` turns keys a row no
longer wants (rejected speculative drafts) into such keys, cropping what no row keeps.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .model import A3ForCausalLM


class ContentCache:
    """Content K/V of committed tokens, with the group id and validity of every cached key.

    key_groups_BK [B, K]: group id of each cached content key; key_valid_BK [B, K]: False for padded or
    dropped slots. K grows by the number of content slots of every step.
    """

    def __init__(self, model: A3ForCausalLM, batch_size: int, device: torch.device | None = None):
        device = device or model.device
        self.kv = DynamicCache(config=model.model.config)
        self.key_groups_BK = torch.empty(batch_size, 0, dtype=torch.long, device=device)
        self.key_valid_BK = torch.empty(batch_size, 0, dtype=torch.bool, device=device)

    @property
    def num_keys(self) -> int:
        """How many content slots (valid or padded) are cached per row."""
        return self.key_groups_BK.shape[1]

    def append(self, groups_BC: torch.Tensor, valid_BC: torch.Tensor) -> None:
        """Record the group ids and validity of C new content slots (their K/V come from the forward)."""
        self.key_groups_BK = torch.cat([self.key_groups_BK, groups_BC], dim=1)
        self.key_valid_BK = torch.cat([self.key_valid_BK, valid_BC.bool()], dim=1)

    def drop(self, drop_BK: torch.Tensor) -> None:
        """Invalidate keys [B, K] (never attended again); crop the trailing slots no row keeps."""
        self.key_valid_BK = self.key_valid_BK & ~drop_BK
        kept = self.key_valid_BK.any(0)
        keep = int(kept.nonzero()[-1]) + 1 if bool(kept.any()) else 0
        if keep < self.num_keys:
            self.kv.crop(keep - self.num_keys)  # a negative count: how many to remove
            self.key_groups_BK, self.key_valid_BK = self.key_groups_BK[:, :keep], self.key_valid_BK[:, :keep]


__all__ = ["ContentCache"]

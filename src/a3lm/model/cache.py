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
from transformers.cache_utils import Cache, CacheLayerMixin


class ContentKVLayer(CacheLayerMixin):
    """One layer's cached K/V [B, G, length, D] in a buffer that grows by doubling.

    `DynamicLayer` concatenates on every update, so each decoding step copies every cached key of
    every layer (and a step's query slots are appended, then cropped, again). Here an update writes
    only the new slots and a crop only moves the end: a step costs what it adds, however long the
    context. Every layer holds every key, windowed or not: `decode_step` cuts windows in the masks.
    """

    is_croppable = True
    is_sliding = False

    def __init__(self, **kwargs):
        super().__init__()
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._keys, self._values = key_states[:, :, :0], value_states[:, :, :0]
        self.is_initialized = True

    def _reserve(self, capacity: int) -> None:
        if capacity <= self._keys.shape[2]:
            return
        capacity = max(capacity, 2 * self._keys.shape[2], 64)
        grown = []
        for old in (self._keys, self._values):
            new = old.new_empty(*old.shape[:2], capacity, old.shape[3])
            new[:, :, : self.length] = old[:, :, : self.length]
            grown.append(new)
        self._keys, self._values = grown

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append [B, G, S, D] new keys and values; returns all of them [B, G, length, D] (views)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[2]
        self._reserve(end)
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self._set_length(end)
        return self.keys, self.values

    def _set_length(self, length: int) -> None:
        self.length = length
        self.keys, self.values = self._keys[:, :, :length], self._values[:, :, :length]

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last -tokens_to_remove slots (a negative count, as `DynamicLayer.crop` takes)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of slots to remove, got {tokens_to_remove}")
        if self.is_initialized:
            self._set_length(max(self.length + tokens_to_remove, 0))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1


class ContentCache:
    """Content K/V of committed tokens, with the group id and validity of every cached key.

    key_groups_BK [B, K]: group id of each cached content key; key_valid_BK [B, K]: False for padded or
    dropped slots; key_positions_BK [B, K]: each key's position (sliding windows are cut by it). K
    grows by the number of content slots of every step.
    """

    def __init__(self, batch_size: int, device: torch.device | str = "cpu"):
        self.kv = Cache(layer_class_to_replicate=ContentKVLayer)
        self.key_groups_BK = torch.empty(batch_size, 0, dtype=torch.long, device=device)
        self.key_valid_BK = torch.empty(batch_size, 0, dtype=torch.bool, device=device)
        self.key_positions_BK = torch.empty(batch_size, 0, dtype=torch.long, device=device)

    @property
    def num_keys(self) -> int:
        """How many content slots (valid or padded) are cached per row."""
        return self.key_groups_BK.shape[1]

    def append(self, groups_BC: torch.Tensor, valid_BC: torch.Tensor, positions_BC: torch.Tensor) -> None:
        """Record the group ids, validity and positions of C new content slots (K/V come from the forward)."""
        self.key_groups_BK = torch.cat([self.key_groups_BK, groups_BC], dim=1)
        self.key_valid_BK = torch.cat([self.key_valid_BK, valid_BC.bool()], dim=1)
        self.key_positions_BK = torch.cat([self.key_positions_BK, positions_BC.long()], dim=1)

    def drop(self, drop_BK: torch.Tensor) -> None:
        """Invalidate keys [B, K] (never attended again); crop the trailing slots no row keeps."""
        self.key_valid_BK = self.key_valid_BK & ~drop_BK
        kept = self.key_valid_BK.any(0)
        keep = int(kept.nonzero()[-1]) + 1 if bool(kept.any()) else 0
        if keep < self.num_keys:
            self.kv.crop(keep - self.num_keys)  # a negative count: how many to remove
            self.key_groups_BK, self.key_valid_BK = self.key_groups_BK[:, :keep], self.key_valid_BK[:, :keep]
            self.key_positions_BK = self.key_positions_BK[:, :keep]

"""Exact content-stream KV cache for A3 decoding (DESIGN.md section 4).

The content K/V of a position in group k depend only on groups <= k, so once a group is committed and
every later group comes after it, its K/V never change: caching them is exact, not an approximation.

One `step` is one decoder forward of

    [content of the tokens just committed (C slots) ; query slots of the positions to score (Q slots)]

against the cached content keys. The content slots' K/V are appended to the cache; the query slots'
K/V are cropped again (no token ever attends to a query slot, and the registered attention function
never reads them: it cuts the keys to the mask's width, cached + C).

Rows of a batch may commit / score different numbers of positions in a step: the caller pads them
and passes `valid` masks. A padded content slot stays in the cache as an invalid key (never attended);
a padded query slot gives a logits row that the caller ignores.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .masks import group_attention_mask
from .model import A3ForCausalLM


class ContentCache:
    """Content K/V of committed tokens, with the group id and validity of every cached key.

    key_groups_BK [B, K]: group id of each cached content key; key_valid_BK [B, K]: False for padded
    slots. K grows by the number of content slots of every step.
    """

    def __init__(self, model: A3ForCausalLM, batch_size: int, device: torch.device | None = None):
        self.model = model
        device = device or model.device
        self.kv = DynamicCache(config=model.model.config)
        self.key_groups_BK = torch.empty(batch_size, 0, dtype=torch.long, device=device)
        self.key_valid_BK = torch.empty(batch_size, 0, dtype=torch.bool, device=device)

    @property
    def num_keys(self) -> int:
        """How many content slots (valid or padded) are cached per row."""
        return self.key_groups_BK.shape[1]

    @torch.no_grad()
    def step(
        self,
        content_ids_BC: torch.Tensor,
        content_positions_BC: torch.Tensor,
        content_groups_BC: torch.Tensor,
        content_valid_BC: torch.Tensor,
        query_positions_BQ: torch.Tensor,
        query_groups_BQ: torch.Tensor,
    ) -> torch.Tensor:
        """Append the committed content, score the query slots; returns logits [B, Q, V].

        A query slot of group g attends to the cached content of groups < g: to see every committed
        token, give it a group larger than all of them ("the next group"). A content slot of group g
        attends to cached keys of groups <= g, its own group included (bidirectional inside a group).
        """
        C, Q = content_ids_BC.shape[1], query_positions_BQ.shape[1]
        if self.num_keys + C == 0:
            raise ValueError("the first cache step needs content to attend to (at least one known token)")
        self.key_groups_BK = torch.cat([self.key_groups_BK, content_groups_BC], dim=1)
        self.key_valid_BK = torch.cat([self.key_valid_BK, content_valid_BC.bool()], dim=1)

        strict_BQ = torch.zeros(C + Q, dtype=torch.bool, device=content_ids_BC.device)
        strict_BQ[C:] = True
        mask = group_attention_mask(
            torch.cat([content_groups_BC, query_groups_BQ], dim=1),
            strict_BQ.expand(content_ids_BC.shape[0], -1),
            self.key_groups_BK,
            self.key_valid_BK,
        )
        hidden = self.model.model(
            inputs_embeds=self.model.stream_embeds(content_ids_BC, Q),
            attention_mask=mask,
            position_ids=torch.cat([content_positions_BC, query_positions_BQ], dim=1),
            past_key_values=self.kv,
            use_cache=True,
        ).last_hidden_state
        if Q:
            self.kv.crop(-Q)  # the query slots' K/V: never attended, never kept
        return self.model.lm_head(hidden[:, C:])


__all__ = ["ContentCache"]

"""The canvas a decoding run fills, its output, and one decoding forward (cached or not)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from a3lm.groups import PAD_GROUP
from a3lm.model.cache import ContentCache
from a3lm.model.modeling import A3ForCausalLM


@dataclass
class StepLogits:
    """The logits of one decoding step: positions_BQ are canvas columns (-1 = padded slot)."""

    positions_BQ: torch.Tensor
    logits_BQV: torch.Tensor


# called after every decoding step with the canvas, the step number and that step's scored logits (a
# server streams fills from it; setting canvas.finished[b] stops filling row b, raising aborts the run)
StepHook = Callable[["Canvas", int, StepLogits], None]


@dataclass
class GenerationOutput:
    """What a decoding run returns; every tensor is [B, N] over the canvas.

    sequences: token ids (pad_token_id on padding). attention_mask: 1 = real token.
    fill_step: -1 padding, 0 given (prompt / known), t >= 1 generated at step t (the fill order).
    group_ids: the factorization actually used (known tokens left-to-right singletons, then one group
    per step; PAD_GROUP on padding), so `sequence_logprobs(model, sequences, group_ids,
    attention_mask)` scores the generated tokens under the order that produced them.
    num_steps: decoder forwards. step_logits: per step, the scored positions and their logits (only
    with output_logits=True). drafted / accepted: speculative decoding's verified drafts and how many
    of them were accepted (the first draft of a window, always accepted, is not counted).
    position_ids: each column's position, as decoding used it.
    untruncated: set when stopping at EOS dropped tokens that were committed after a row's first EOS.
    In an order other than left to right such a token may have come before kept ones and been their
    context, so the truncated output no longer scores exactly. The untruncated canvas (every token
    committed, with its group; positions never filled are holes) does, with its position_ids:
    `sequence_logprobs(model, w.sequences, w.group_ids, w.attention_mask, position_ids=w.position_ids)`
    for `w = out.untruncated or out`. Left to right, both agree on the kept tokens.
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    fill_step: torch.Tensor
    group_ids: torch.Tensor
    num_steps: int
    position_ids: torch.Tensor | None = None
    step_logits: list[StepLogits] | None = None
    drafted: int = 0
    accepted: int = 0
    untruncated: GenerationOutput | None = None


# -- the canvas and one decoding forward -----------------------------------------------------------


@dataclass
class Canvas:
    """Decoding state [B, N]: tokens, which are real / known / filled, their group and fill step."""

    ids: torch.Tensor
    real: torch.Tensor
    known: torch.Tensor
    positions: torch.Tensor
    filled: torch.Tensor
    group: torch.Tensor  # PAD_GROUP until committed
    fill_step: torch.Tensor
    finished: torch.Tensor  # [B]: stopped at EOS
    after_eos: torch.Tensor  # [B, N]: after a row's first generated EOS (dropped from the output)

    @classmethod
    def start(cls, ids_BN, real_BN, known_BN, positions_BN) -> Canvas:
        real = real_BN.bool()
        known = known_BN.bool() & real
        n_known_B = known.sum(1)
        if bool((n_known_B == 0).any()):
            raise ValueError(
                f"row {int((n_known_B == 0).nonzero()[0])} has no known token: decoding needs a prompt (at "
                "least BOS)"
            )
        group = torch.where(known, known.long().cumsum(1) - 1, PAD_GROUP)
        finished = torch.zeros(ids_BN.shape[0], dtype=torch.bool, device=ids_BN.device)
        after_eos = torch.zeros_like(real)
        return cls(
            ids_BN.clone(),
            real,
            known,
            positions_BN,
            known.clone(),
            group,
            torch.where(known, 0, -1),
            finished,
            after_eos,
        )

    @property
    def n_known(self) -> torch.Tensor:
        return self.known.sum(1)

    def unfilled(self) -> torch.Tensor:
        """[B, N]: what is left to fill; nothing after a row's first generated EOS (it is dropped)."""
        return self.real & ~self.filled & ~self.finished[:, None] & ~self.after_eos

    def commit(self, cols_BQ, tokens_BQ, chosen_BQ, groups_BQ, step: int) -> None:
        """Write tokens at cols where chosen, with their group ids and fill step (no host sync).

        cols may repeat within a row on slots that are not chosen (padding): scatter-adds of the chosen
        slots' values alone are exact where a sum of one nonzero term is.
        """
        hit_BN = torch.zeros_like(self.filled).scatter_add(1, cols_BQ, chosen_BQ)  # bool: adds are ors

        def put(t: torch.Tensor, values) -> torch.Tensor:
            values = torch.as_tensor(values, device=t.device).to(t.dtype).expand(cols_BQ.shape)
            written = torch.zeros_like(t).scatter_add(1, cols_BQ, values * chosen_BQ)
            return torch.where(hit_BN, written, t)

        self.ids, self.group, self.fill_step = (
            put(self.ids, tokens_BQ),
            put(self.group, groups_BQ),
            put(self.fill_step, step),
        )
        self.filled = self.filled | hit_BN

    def stop_at_eos(self, eos_ids: torch.Tensor | None) -> None:
        """Mark what follows each row's first generated EOS, and the rows with nothing left before it."""
        if eos_ids is None:
            return
        N = self.ids.shape[1]
        eos = self.filled & ~self.known & torch.isin(self.ids, eos_ids)
        first_B = torch.where(eos.any(1), eos.int().argmax(1), N)
        self.after_eos = (
            self.real & ~self.known & (torch.arange(N, device=eos.device)[None] > first_B[:, None])
        )
        self.finished |= ~(self.real & ~self.filled & ~self.after_eos).any(1) & eos.any(1)

    def output(
        self, eos_ids: torch.Tensor | None, pad_token_id: int, num_steps: int, **extra
    ) -> GenerationOutput:
        """The canvas as output; with eos_ids, cut after each row's first generated EOS (`after_eos`, kept
        current by `stop_at_eos` after every commit)."""
        whole = self._as_output(self.real & self.filled, pad_token_id, num_steps, **extra)
        if eos_ids is None:
            return whole
        kept = self.real & self.filled & ~self.after_eos
        if bool(torch.equal(kept, self.real & self.filled)):
            return whole
        return self._as_output(kept, pad_token_id, num_steps, untruncated=whole, **extra)

    def _as_output(self, real: torch.Tensor, pad_token_id: int, num_steps: int, **extra) -> GenerationOutput:
        return GenerationOutput(
            sequences=self.ids.masked_fill(~real, pad_token_id),
            attention_mask=real.long(),
            fill_step=self.fill_step.masked_fill(~real, -1),
            group_ids=self.group.masked_fill(~real, PAD_GROUP),
            num_steps=num_steps,
            position_ids=self.positions,
            **extra,
        )


class StepForward:
    """One decoding forward: the cached step, or (use_cache=False) the full two-stream reference."""

    def __init__(self, model: A3ForCausalLM, batch_size: int, use_cache: bool):
        self.model = model
        self.cache = ContentCache(batch_size, model.device) if use_cache else None

    def __call__(
        self,
        canvas: Canvas,
        content_cols_BC,
        content_valid_BC,
        query_cols_BQ,
        query_valid_BQ,
        query_groups_BQ,
        ids_BN: torch.Tensor | None = None,
        group_BN: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, Q, V] of query slots (canvas columns) of the given groups, after appending the
        content at content_cols. ids_BN / group_BN: the canvas's with uncommitted content (drafts)."""
        ids = canvas.ids if ids_BN is None else ids_BN
        group = canvas.group if group_BN is None else group_BN
        pos = canvas.positions
        if self.cache is not None:
            return self.model.decode_step(
                self.cache,
                ids.gather(1, content_cols_BC),
                pos.gather(1, content_cols_BC),
                group.gather(1, content_cols_BC),
                content_valid_BC,
                pos.gather(1, query_cols_BQ),
                query_groups_BQ,
            )
        # reference: the whole canvas. Unassigned positions get a group above every query's (never seen);
        # the query slots scored carry their query group (their content is never seen either)
        group = torch.where(group >= 0, group, 2 * ids.shape[1] + 1)
        group = scatter_where(group, query_cols_BQ, query_valid_BQ, query_groups_BQ).masked_fill(
            ~canvas.real, PAD_GROUP
        )
        logits_BNV = self.model(
            input_ids=ids, group_ids=group, attention_mask=canvas.real.long(), position_ids=pos
        ).logits
        return logits_BNV.gather(1, query_cols_BQ[..., None].expand(-1, -1, logits_BNV.shape[-1]))


def scatter_where(
    target_BN: torch.Tensor, cols_BQ: torch.Tensor, where_BQ: torch.Tensor, values
) -> torch.Tensor:
    """target with values written at cols where `where` holds (each written column at most once per row;
    cols of the other slots may repeat and point anywhere)."""
    values = torch.as_tensor(values, device=target_BN.device).to(target_BN.dtype).expand(cols_BQ.shape)
    hit_BN = torch.zeros_like(target_BN, dtype=torch.int32).scatter_add(1, cols_BQ, where_BQ.int()) > 0
    zero = torch.zeros((), dtype=target_BN.dtype, device=target_BN.device)
    written_BN = torch.zeros_like(target_BN).scatter_add(1, cols_BQ, torch.where(where_BQ, values, zero))
    return torch.where(hit_BN, written_BN, target_BN)


def mask_to_cols(mask_BN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns of the True entries of each row, left to right, padded: cols [B, M], valid [B, M]."""
    counts = mask_BN.sum(1)
    M = int(counts.max()) if mask_BN.numel() else 0
    cols = (~mask_BN).to(torch.int8).argsort(dim=1, stable=True)[:, :M]
    valid = torch.arange(M, device=mask_BN.device)[None] < counts[:, None]
    return cols, valid


def compact(
    cols_BQ: torch.Tensor, keep_BQ: torch.Tensor, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept slots of each row moved to the front: cols [B, W], valid [B, W] (W: the most kept)."""
    width = int(keep_BQ.sum(1).max()) if width is None else width
    first = (~keep_BQ).to(torch.int8).argsort(dim=1, stable=True)[:, :width]
    return cols_BQ.gather(1, first), keep_BQ.gather(1, first)

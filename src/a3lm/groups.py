"""Group ids: which positions are predicted together, and in which order.

A `group_ids` tensor [B, N] (int64) assigns every real token a group; a smaller id is an earlier
group. Ids need not be contiguous nor sorted by position. Padded positions (attention_mask == 0)
carry `PAD_GROUP` (-1). A position is *predictable* when some real token has a smaller id, so the
earliest group of each sample (usually BOS alone) is context only.

Every builder takes the `attention_mask` [B, N] (1 = real token) so that groupings are counted over
real tokens only: left- and right-padded rows get the same grouping of their real tokens. Every
builder is the same shape of grouping: some known tokens first (BOS, a prompt, the sides of a blank) as
left-to-right singletons, then the other tokens in the groups of `fill_groups`, the one place where an
order becomes groups (decoding and scoring use it directly).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PAD_GROUP = -1
# Every named order: the fill order of a canvas's positions to fill (sampling, infilling, scoring) and
# of a whole row after BOS (training). A custom order is a permutation of the positions' ranks.
ORDERS = ("left-to-right", "right-to-left", "random", "random-blocks")
Order = str | torch.Tensor | Sequence[torch.Tensor]
# a random order's source: one generator for the batch, or one per row (batch-independent orders)
Generators = torch.Generator | Sequence[torch.Generator] | None


def _as_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [B, N], got shape {tuple(attention_mask.shape)}")
    return attention_mask.bool()


def check_order(order: Order, named: bool = False) -> None:
    """Raise a ValueError when `order` is neither a name in ORDERS nor a custom order (permutations).

    named=True: a name only, where a custom permutation has no meaning (an order given as text, or one
    order for requests of different lengths).
    """
    choices = ", ".join(ORDERS) + ("" if named else " or give a custom order")
    if isinstance(order, str):
        if order not in ORDERS:  # text names an order: a permutation is never text (the CLI has none)
            raise ValueError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
    elif named:
        raise ValueError(f"order must be one of {choices}, got a {type(order).__name__}")
    elif not isinstance(order, torch.Tensor | Sequence):
        raise TypeError(f"order must be a name or permutation tensor(s), got {type(order).__name__}")


def _random_keys(fill_BN: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Uniform keys [B, N] on fill_BN's device, drawn where the generators live (a CPU generator may
    order a batch on the GPU).

    One generator (or None): one [B, N] draw. One generator per row: row b draws a key for each of its
    own fill positions, left to right, so that its keys depend on its generator and its number of fill
    positions alone, never on padding or on the other rows (positions not to fill get no key).
    """
    if generator is None or isinstance(generator, torch.Generator):
        device = fill_BN.device if generator is None else generator.device
        return torch.rand(fill_BN.shape, generator=generator, device=device).to(fill_BN.device)
    if len(generator) != fill_BN.shape[0]:
        raise ValueError(f"per-row generators: got {len(generator)} for {fill_BN.shape[0]} rows")
    keys_BN = torch.full(fill_BN.shape, 2.0, device=fill_BN.device)
    counts = fill_BN.sum(1).tolist()
    draws = [torch.rand(n, generator=g, device=g.device) for g, n in zip(generator, counts, strict=True)]
    keys_BN[fill_BN] = torch.cat(draws).to(fill_BN.device)  # row-major: row b's keys, left to right
    return keys_BN


def _random_ranks(keys_BN: torch.Tensor, member_BN: torch.Tensor) -> torch.Tensor:
    """Rank [B, N] of every member by its random key (0 = smallest); non-members rank after them."""
    perm = keys_BN.masked_fill(~member_BN, 2.0).argsort(dim=1)
    ranks = torch.arange(keys_BN.shape[1], device=keys_BN.device).expand_as(perm)
    return torch.empty_like(perm).scatter_(1, perm, ranks)


def _custom_ranks(fill_BN: torch.Tensor, rank_BN: torch.Tensor, order) -> torch.Tensor:
    """Fill ranks from permutations of the left-to-right ranks: one shared 1-D tensor or one per row."""
    B, N = fill_BN.shape
    counts = fill_BN.sum(1)
    if isinstance(order, torch.Tensor) and order.dim() == 1:
        n = order.numel()
        if bool((counts != n).any()) or not torch.equal(order.sort().values.cpu(), torch.arange(n)):
            raise ValueError(
                f"a shared custom order must be a permutation of 0..{int(counts.max()) - 1} for every row"
            )
        return torch.argsort(order.to(rank_BN.device)).gather(0, rank_BN.clamp(min=0).flatten()).view(B, N)
    if len(order) != B:
        raise ValueError(f"a custom order needs one permutation per row: got {len(order)} for {B} rows")
    out = torch.full_like(rank_BN, -1)
    for b, perm in enumerate(order):
        cols = fill_BN[b].nonzero().squeeze(-1)
        perm = torch.as_tensor(perm, dtype=torch.long).cpu()
        if perm.numel() != cols.numel() or not torch.equal(perm.sort().values, torch.arange(cols.numel())):
            raise ValueError(
                f"custom order of row {b} must be a permutation of its {cols.numel()} positions to fill"
            )
        out[b, cols[perm.to(cols.device)]] = torch.arange(cols.numel(), device=out.device)
    return out


def fill_groups(
    fill_mask_BN: torch.Tensor, order: Order = "left-to-right", size: int = 1, generator: Generators = None
) -> torch.Tensor:
    """Relative group index [B, N] of every position to fill (0 = filled first), -1 elsewhere.

    The one place where an order becomes groups: the positions with fill_mask True are ranked by
    `order` and chunked into groups of `size` (size 1: the index is the fill rank). Orders:
    left-to-right, right-to-left, random (any subset), random-blocks (contiguous spans of `size` in a
    random order), or a custom order: a permutation of the positions' left-to-right ranks (0 =
    leftmost), one 1-D tensor shared by every row or a sequence with one per row.

    generator (random orders): one for the whole batch, or a sequence with one per row, each row's
    order then drawn from its own generator and its own fill positions only: the same row gets the
    same order alone or in any batch, padded on either side.
    """
    fill = _as_mask(fill_mask_BN)
    if size < 1:
        raise ValueError(f"group size must be >= 1, got {size}")
    check_order(order)
    rank = fill.long().cumsum(1) - 1  # left to right
    if not isinstance(order, str):
        rank = _custom_ranks(fill, rank, order)
    elif order == "right-to-left":
        rank = fill.sum(1, keepdim=True) - 1 - rank
    elif order == "random":
        rank = _random_ranks(_random_keys(fill, generator), fill)
    elif order == "random-blocks":  # spans of `size` by left-to-right rank, the spans in a random order
        cols = torch.arange(fill.shape[1], device=fill.device).expand_as(rank)
        first = fill & (rank % size == 0)  # a span is named by its first position
        span_rank = _random_ranks(_random_keys(fill, generator), first)
        return torch.where(fill, span_rank.gather(1, torch.where(first, cols, 0).cummax(1).values), -1)
    return torch.where(fill, torch.div(rank, size, rounding_mode="floor"), -1)


def _lead_mask(mask: torch.Tensor, n_lead: int) -> torch.Tensor:
    """[B, N] bool: the first `n_lead` real tokens of each row (BOS)."""
    return mask & (mask.long().cumsum(1) <= n_lead)


def _known_first(
    known: torch.Tensor, mask: torch.Tensor, order: Order, size: int, generator: Generators
) -> torch.Tensor:
    """Known real tokens as left-to-right singletons 0..K_b-1, then the other real tokens in the groups of
    `fill_groups` shifted past them; PAD_GROUP on padding. known, mask: [B, N] bool."""
    known = known & mask
    fill = fill_groups(mask & ~known, order, size, generator)
    rest = torch.where(fill >= 0, known.sum(1, keepdim=True) + fill, PAD_GROUP)
    return torch.where(known, known.long().cumsum(1) - 1, rest)


def left_to_right(attention_mask: torch.Tensor, size: int = 1, n_lead: int = 1) -> torch.Tensor:
    """Contiguous groups of `size` left to right after `n_lead` singletons (size 1: plain AR)."""
    mask = _as_mask(attention_mask)
    return _known_first(_lead_mask(mask, n_lead), mask, "left-to-right", size, None)


def contiguous(attention_mask: torch.Tensor, size: int, n_lead: int = 1) -> torch.Tensor:
    """BOS alone, then contiguous groups of `size` left to right (curriculum stage 2)."""
    return left_to_right(attention_mask, size, n_lead)


def right_to_left(attention_mask: torch.Tensor, size: int = 1, n_lead: int = 1) -> torch.Tensor:
    """The `n_lead` first tokens (BOS) first, then the rest from the end backwards."""
    mask = _as_mask(attention_mask)
    return _known_first(_lead_mask(mask, n_lead), mask, "right-to-left", size, None)


def random_order(
    attention_mask: torch.Tensor,
    size: int,
    generator: torch.Generator | None = None,
    n_lead: int = 1,
    blocks: bool = False,
) -> torch.Tensor:
    """BOS first, then the other tokens in a random order per sample, in groups of `size`.

    blocks=False: any subset (order "random"). blocks=True: contiguous spans of `size` tokens, the spans
    in a random order ("random-blocks").
    """
    mask = _as_mask(attention_mask)
    return _known_first(
        _lead_mask(mask, n_lead), mask, "random-blocks" if blocks else "random", size, generator
    )


def infill_groups(
    known_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    size: int = 1,
    order: Order = "left-to-right",
    generator: Generators = None,
) -> torch.Tensor:
    """Group ids [B, N]: every known token first (left-to-right singletons), then the blanks in groups
    of `size` in `order` (any order `fill_groups` takes; a custom one ranks each row's blanks), a random
    one drawn from `generator` as in `fill_groups` (one, or one per row).

    known_mask [B, N]: True where the token is given (prefix, suffix, BOS), False where it is to be
    predicted. attention_mask [B, N] (default: every token real).
    """
    known = _as_mask(known_mask)
    mask = torch.ones_like(known) if attention_mask is None else _as_mask(attention_mask)
    if known.shape != mask.shape:
        raise ValueError(
            f"known_mask {tuple(known.shape)} and attention_mask {tuple(mask.shape)} differ in shape"
        )
    if not bool((known & mask).any(1).all()):
        raise ValueError("infilling needs at least one known token (BOS) per sample")
    return _known_first(known, mask, order, size, generator)


def build(
    order: str, attention_mask: torch.Tensor, size: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Group ids for a named order (one of ORDERS) after BOS: left-to-right, right-to-left, random or
    random-blocks."""
    check_order(order, named=True)
    mask = _as_mask(attention_mask)
    return _known_first(_lead_mask(mask, 1), mask, order, size, generator)


def predictable(group_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, N] bool: real tokens that have at least one real token in an earlier group."""
    mask = group_ids >= 0 if attention_mask is None else attention_mask.bool()
    big = torch.iinfo(group_ids.dtype).max
    first = torch.where(mask, group_ids, big).min(dim=1, keepdim=True).values
    return mask & (group_ids > first)


def validate_group_ids(
    group_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
) -> None:
    """Raise a ValueError naming the problem when group ids cannot be used.

    targets [B, N] bool (optional): positions that must be predictable.
    """
    if not isinstance(group_ids, torch.Tensor):
        raise TypeError(f"group_ids must be a torch.Tensor, got {type(group_ids).__name__}")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool or group_ids.is_complex():
        raise TypeError(f"group_ids must be an integer tensor (torch.long), got {group_ids.dtype}")
    if group_ids.dim() != 2:
        raise ValueError(f"group_ids must be [B, N], got shape {tuple(group_ids.shape)}")
    for name, other in (("input_ids", input_ids), ("attention_mask", attention_mask), ("targets", targets)):
        if other is None:
            continue
        if other.shape[0] != group_ids.shape[0]:
            raise ValueError(
                f"batch size mismatch: group_ids has {group_ids.shape[0]} rows, {name} has {other.shape[0]}"
            )
        if other.shape != group_ids.shape:
            raise ValueError(
                f"shape mismatch: group_ids {tuple(group_ids.shape)} vs {name} {tuple(other.shape)}"
            )
    mask = torch.ones_like(group_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    on_pad = ~mask & (group_ids != PAD_GROUP)
    if on_pad.any():
        b, i = on_pad.nonzero()[0].tolist()
        raise ValueError(
            f"group ids on padding: sample {b}, position {i} is padding (attention_mask 0) but has group id "
            f"{int(group_ids[b, i])}; padded positions must carry {PAD_GROUP}"
        )
    negative = mask & (group_ids < 0)
    if negative.any():
        b, i = negative.nonzero()[0].tolist()
        raise ValueError(
            f"negative group id {int(group_ids[b, i])} on a real token (sample {b}, position {i})"
        )
    empty = ~mask.any(dim=1)
    if empty.any():
        raise ValueError(f"sample {int(empty.nonzero()[0])} has no real tokens")
    if targets is not None:
        bad = targets.bool() & ~predictable(group_ids, mask)
        if bad.any():
            b, i = bad.nonzero()[0].tolist()
            why = (
                "is padding"
                if not mask[b, i]
                else f"has no real token in an earlier group (group {int(group_ids[b, i])})"
            )
            raise ValueError(
                f"target not predictable: sample {b}, position {i} {why}; the earliest group is context only"
            )

"""The training curriculum: which grouping every sample of every step is trained on.

    stage 0  plain AR pretraining of the base decoder (only the embedded default, which starts from
             random weights; a real run starts from a pretrained AR checkpoint and skips it)
    stage 1  AR initialisation: single-token groups, left to right
    stage 2  group extension: contiguous groups, size growing 1 -> stage2_max_size over the stage
    stage 3  order permutation: BOS first, then groups of a size drawn per sample in
             1..stage3_max_size, in a random order; a share of samples may be infilling-shaped
             (known prefix and suffix left to right first, the blanks permuted) or block-shaped
             (contiguous spans in a random order)

Stages run in the order listed in `stages`; a stage not listed is skipped (the paper's ablation:
`stages=[3]`). Steps are global across stages, so a step number alone says where a run is, and a
resumed run lands mid-stage at the same place. Each sample draws its own grouping from its rank's
generator, seeded from (seed, rank), so ranks never draw the same groupings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from a3lm import groups

STAGES = (0, 1, 2, 3)


@dataclass
class CurriculumConfig:
    """Steps per stage (optimizer steps) and group sizes."""

    stages: list[int] = field(default_factory=lambda: [1, 2, 3])
    stage0_steps: int = 0
    stage1_steps: int = 100
    stage2_steps: int = 300
    stage3_steps: int = 600
    stage2_max_size: int = 4
    stage3_max_size: int = 4  # the paper's 4; 8 is the long-group option
    infill_share: float = 0.0  # share of stage-3 samples with infilling-shaped orders
    block_share: float = 0.0  # share of stage-3 samples with contiguous spans in a random order
    seed: int | None = None  # the groupings; None: the run's `seed`

    def steps(self, stage: int) -> int:
        return getattr(self, f"stage{stage}_steps") if stage in self.stages else 0

    @property
    def total_steps(self) -> int:
        return sum(self.steps(s) for s in self.stages)

    def spans(self) -> list[tuple[int, int, int]]:
        """(stage, first step, end step) of every listed stage, in run order."""
        out, start = [], 0
        for s in self.stages:
            out.append((s, start, start + self.steps(s)))
            start += self.steps(s)
        return out

    def validate(self) -> None:
        if not self.stages:
            raise ValueError("curriculum.stages is empty: list at least one of the stages 0, 1, 2, 3")
        if any(s not in STAGES for s in self.stages) or len(set(self.stages)) != len(self.stages):
            raise ValueError(f"curriculum.stages must be distinct stages among {STAGES}, got {self.stages}")
        if sorted(self.stages) != list(self.stages):
            raise ValueError(f"curriculum.stages must be in increasing order, got {self.stages}")
        for s in self.stages:
            if self.steps(s) < 1:
                raise ValueError(
                    f"stage {s} is listed but has {self.steps(s)} steps; "
                    f"give curriculum.stage{s}_steps >= 1, "
                    f"or drop {s} from curriculum.stages to skip it"
                )
        for name in ("stage2_max_size", "stage3_max_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"curriculum.{name} must be a group size >= 1, got {getattr(self, name)}")
        for name in ("infill_share", "block_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"curriculum.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.infill_share + self.block_share > 1.0:
            raise ValueError("curriculum.infill_share + curriculum.block_share must not exceed 1")


@dataclass(frozen=True)
class GroupPolicy:
    """How the samples of one step are grouped.

    order: "ar" (stage 0: plain next-token loss of the base model, no groups), "contiguous"
    (left-to-right groups of exactly `size`) or "random" (per-sample size uniform in 1..`size`).
    """

    stage: int
    order: str
    size: int
    step_in_stage: int
    infill_share: float = 0.0
    block_share: float = 0.0


def policy_at(cfg: CurriculumConfig, step: int) -> GroupPolicy:
    """The grouping policy of global optimizer step `step` (0-based)."""
    for stage, start, end in cfg.spans():
        if start <= step < end:
            k = step - start
            if stage == 0:
                return GroupPolicy(0, "ar", 1, k)
            if stage == 1:
                return GroupPolicy(1, "contiguous", 1, k)
            if stage == 2:
                # equal-length plateaus: size 1 for the first 1/max of the stage, ..., max for the last
                size = min(cfg.stage2_max_size, 1 + k * cfg.stage2_max_size // (end - start))
                return GroupPolicy(2, "contiguous", size, k)
            return GroupPolicy(3, "random", cfg.stage3_max_size, k, cfg.infill_share, cfg.block_share)
    raise ValueError(f"step {step} is past the curriculum's {cfg.total_steps} steps")


def rank_generator(seed: int, rank: int, salt: tuple[int, ...] = ()) -> torch.Generator:
    """A CPU generator for (seed, rank[, salt]): independent streams per rank (SeedSequence mixing)."""
    state = np.random.SeedSequence([seed, rank, *salt]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> 1))


def _known_around_random_span(n: int, generator: torch.Generator) -> torch.Tensor:
    """Known mask [n] of an infilling shape: BOS + prefix [0, a) and suffix [b, n) known, [a, b) blank."""
    a = int(torch.randint(1, n, (1,), generator=generator))
    b = int(torch.randint(a + 1, n + 1, (1,), generator=generator))
    known = torch.ones(n, dtype=torch.bool)
    known[a:b] = False
    return known


def draw_group_ids(
    policy: GroupPolicy,
    attention_mask: torch.Tensor,
    generator: torch.Generator,
    known_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group ids [B, N] for one micro-batch; every sample draws its own grouping (stage 3).

    BOS (each row's first real token) is always the earliest group, so it is context only.
    known_mask [B, N] (instruction data: BOS and the prompt): those tokens come first as left-to-right
    singletons, and the policy's order groups the rest (the answer); an infilling-shaped sample also
    knows the answer's tokens around one random span.
    """
    if known_mask is not None:
        return _known_first_groups(policy, attention_mask, known_mask, generator)
    if policy.order in ("ar", "contiguous"):
        return groups.contiguous(attention_mask, policy.size)
    if policy.order != "random":
        raise ValueError(f"unknown grouping order {policy.order!r}")
    rows = []
    for b in range(attention_mask.shape[0]):
        mask = attention_mask[b : b + 1]
        n = int(mask.sum())
        size = int(torch.randint(1, policy.size + 1, (1,), generator=generator))
        u = float(torch.rand((), generator=generator))
        if u < policy.infill_share and n >= 2:
            known = torch.zeros_like(mask, dtype=torch.bool)
            known[mask.bool()] = _known_around_random_span(n, generator).to(mask.device)
            rows.append(groups.infill_groups(known, mask, size, order="random", generator=generator))
        else:
            blocks = u < policy.infill_share + policy.block_share
            rows.append(groups.random_order(mask, size, generator, blocks=blocks))
    return torch.cat(rows, dim=0)


def _known_first_groups(
    policy: GroupPolicy, attention_mask: torch.Tensor, known_mask: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """`draw_group_ids` with `known_mask` tokens first: the same orders, sizes and shares over the rest."""
    if policy.order in ("ar", "contiguous"):
        return groups.infill_groups(known_mask, attention_mask, policy.size, order="left-to-right")
    if policy.order != "random":
        raise ValueError(f"unknown grouping order {policy.order!r}")
    rows = []
    for b in range(attention_mask.shape[0]):
        mask, known = attention_mask[b : b + 1], known_mask[b : b + 1].bool()
        rest = mask.bool() & ~known
        m = int(rest.sum())
        size = int(torch.randint(1, policy.size + 1, (1,), generator=generator))
        u = float(torch.rand((), generator=generator))
        blocks = policy.infill_share <= u < policy.infill_share + policy.block_share
        order = "random-blocks" if blocks else "random"
        if u < policy.infill_share and m >= 1:  # the answer's tokens around one blank span are known too
            known = known.clone()
            # [0] stands for a BOS: the span may start at the answer's first token
            known[rest] = _known_around_random_span(m + 1, generator)[1:].to(mask.device)
            order = "random"
        rows.append(groups.infill_groups(known, mask, size, order=order, generator=generator))
    return torch.cat(rows, dim=0)


def describe(policy: GroupPolicy) -> str:
    """Short text for progress bars and logs: 'stage 2 size 3', 'stage 3 size<=4'."""
    if policy.order == "ar":
        return "stage 0 AR"
    if policy.order == "random":
        return f"stage 3 size<={policy.size}"
    return f"stage {policy.stage} size {policy.size}"

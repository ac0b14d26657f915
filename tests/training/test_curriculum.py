import pytest
import torch

from a3lm.groups import predictable, validate_group_ids
from a3lm.training.curriculum import CurriculumConfig, GroupPolicy, draw_group_ids, policy_at, rank_generator


def cfg(**kw) -> CurriculumConfig:
    c = CurriculumConfig(
        stages=[0, 1, 2, 3], stage0_steps=5, stage1_steps=10, stage2_steps=40, stage3_steps=20, **kw
    )
    c.validate()
    return c


def test_schedule_values_per_step():
    c = cfg()
    assert [(p.stage, p.order, p.size) for p in map(lambda s: policy_at(c, s), [0, 4])] == [(0, "ar", 1)] * 2
    assert [policy_at(c, s).stage for s in (5, 14, 15, 54, 55, 74)] == [1, 1, 2, 2, 3, 3]
    assert all(policy_at(c, s).size == 1 and policy_at(c, s).order == "contiguous" for s in range(5, 15))
    # stage 2: 40 steps, size 1 -> 4 in four equal plateaus of 10 steps
    sizes = [policy_at(c, s).size for s in range(15, 55)]
    assert sizes == [1] * 10 + [2] * 10 + [3] * 10 + [4] * 10
    assert policy_at(c, 60) == GroupPolicy(3, "random", 4, 5, 0.0, 0.0)
    assert policy_at(c, 40).step_in_stage == 25
    with pytest.raises(ValueError, match="past the curriculum"):
        policy_at(c, 75)


def test_skipping_stages_and_long_groups():
    c = CurriculumConfig(stages=[3], stage3_steps=7, stage3_max_size=8)
    c.validate()
    assert c.total_steps == 7 and c.spans() == [(3, 0, 7)]
    assert policy_at(c, 0) == GroupPolicy(3, "random", 8, 0, 0.0, 0.0)


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"stages": []}, "empty"),
        ({"stages": [1, 2, 3], "stage2_steps": 0}, "stage 2 is listed but has 0 steps"),
        ({"stages": [3, 1]}, "increasing"),
        ({"stages": [4]}, "distinct stages"),
        ({"stage3_max_size": 0}, "group size >= 1"),
        ({"stage2_max_size": -1}, "group size >= 1"),
        ({"infill_share": 1.5}, r"in \[0, 1\]"),
        ({"infill_share": 0.7, "block_share": 0.5}, "must not exceed 1"),
    ],
)
def test_bad_configs_are_clear_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        CurriculumConfig(**kw).validate()


@pytest.mark.parametrize("step", [0, 7, 20, 50, 60])
def test_groupings_are_valid_in_every_stage(step):
    c = cfg(infill_share=0.3, block_share=0.3)
    policy = policy_at(c, step)
    mask = torch.ones(16, 12, dtype=torch.long)
    gids = draw_group_ids(policy, mask, rank_generator(0, 0))
    validate_group_ids(gids, mask)
    # BOS alone in the earliest group; every other token is a target
    assert (gids[:, 0] == 0).all() and ((gids == 0).sum(1) == 1).all()
    assert (predictable(gids, mask).sum(1) == 11).all()
    sizes = torch.stack([torch.bincount(g).max() for g in gids[:, 1:]])
    if policy.order == "contiguous":
        assert torch.equal(gids[:, 1:], gids[:1, 1:].expand(16, -1))
        assert (gids[:, 1:].diff(dim=1) >= 0).all()  # left to right
        assert int(sizes.max()) == policy.size
    else:
        assert int(sizes.max()) <= policy.size


def test_stage3_samples_and_ranks_draw_their_own_groupings():
    c = cfg()
    policy = policy_at(c, 60)
    mask = torch.ones(8, 16, dtype=torch.long)
    r0 = draw_group_ids(policy, mask, rank_generator(0, 0))
    r1 = draw_group_ids(policy, mask, rank_generator(0, 1))
    assert len({tuple(g.tolist()) for g in r0}) == 8  # every sample its own grouping
    assert not torch.equal(r0, r1)  # every rank its own stream
    assert torch.equal(
        r0, draw_group_ids(policy, mask, rank_generator(0, 0))
    )  # reproducible from (seed, rank)
    assert not torch.equal(r0, draw_group_ids(policy, mask, rank_generator(1, 0)))
    # some samples are not in left-to-right order: the order really is permuted
    assert any((g[1:].diff() < 0).any() for g in r0)


def _infill_context(g: torch.Tensor) -> int | None:
    """Largest k such that BOS + a prefix + a suffix (k tokens) are singleton groups 0..k-1 left to
    right and one contiguous blank span comes after them all; None when g has no such shape."""
    n, best = len(g), None
    for a in range(1, n):
        for b in range(a + 1, n + 1):
            known = torch.ones(n, dtype=torch.bool)
            known[a:b] = False
            k = int(known.sum())
            if torch.equal(g[known], torch.arange(k)) and bool((g[~known] >= k).all()):
                best = max(best or 0, k)
    return best


def test_infilling_shaped_orders_put_known_spans_first():
    mask = torch.ones(32, 14, dtype=torch.long)
    gids = draw_group_ids(policy_at(cfg(infill_share=1.0), 60), mask, rank_generator(0, 0))
    validate_group_ids(gids, mask)
    ctx = [_infill_context(g) for g in gids]
    assert None not in ctx
    assert sum(ctx) / len(ctx) > 4  # real context spans, not just BOS
    # a plain random order keeps only BOS (and by chance a neighbour or two) as left-to-right context
    plain = draw_group_ids(policy_at(cfg(), 60), mask, rank_generator(0, 0))
    assert sum(_infill_context(g) for g in plain) / 32 < 2

"""Group-id builders and validation: values, and a clear error for each kind of bad input."""

import pytest
import torch

from a3lm import groups, sequence_logprobs

PAD = groups.PAD_GROUP


def test_builders_values():
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    assert groups.left_to_right(mask).tolist() == [[0, 1, 2, 3, 4, 5], [PAD, PAD, 0, 1, 2, 3]]
    assert groups.contiguous(mask, 2).tolist() == [[0, 1, 1, 2, 2, 3], [PAD, PAD, 0, 1, 1, 2]]
    assert groups.right_to_left(mask).tolist() == [[0, 5, 4, 3, 2, 1], [PAD, PAD, 0, 3, 2, 1]]
    known = torch.tensor([[1, 1, 0, 0, 0, 1], [0, 0, 1, 0, 0, 1]])
    assert groups.infill_groups(known, mask, size=2).tolist() == [[0, 1, 3, 3, 4, 2], [PAD, PAD, 0, 2, 2, 1]]


def test_every_builder_is_known_first_then_fill_groups():
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]])
    bos = mask.bool() & (mask.cumsum(1) == 1)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    for order in groups.ORDERS:
        built = groups.build(order, mask, 2, gen())
        assert torch.equal(built, groups.infill_groups(bos, mask, 2, order, gen()))
        fill = groups.fill_groups(mask.bool() & ~bos, order, 2, gen())
        assert torch.equal(built, torch.where(bos, 0, torch.where(fill >= 0, 1 + fill, PAD)))
    assert torch.equal(groups.random_order(mask, 2, gen()), groups.build("random", mask, 2, gen()))
    assert torch.equal(
        groups.random_order(mask, 2, gen(), blocks=True), groups.build("random-blocks", mask, 2, gen())
    )
    # a custom order lists the blanks' left-to-right ranks in fill order
    known = torch.tensor([[1, 1, 0, 0, 0, 1]])
    assert groups.infill_groups(known, order=torch.tensor([2, 0, 1])).tolist() == [[0, 1, 4, 5, 3, 2]]
    assert groups.infill_groups(known, order="right-to-left").tolist() == [[0, 1, 5, 4, 3, 2]]


def test_random_order_bos_first_sizes_and_per_sample():
    mask = torch.ones(4, 13, dtype=torch.long)
    g = groups.random_order(mask, 4, torch.Generator().manual_seed(0))
    assert (g[:, 0] == 0).all() and (g[:, 1:] > 0).all()
    for row in g:
        assert sorted(torch.bincount(row[1:]).tolist()[1:]) == [4, 4, 4]
    assert len({tuple(r.tolist()) for r in g}) == 4  # each sample draws its own order
    blocks = groups.random_order(mask, 4, torch.Generator().manual_seed(0), blocks=True)
    for row in blocks:  # contiguous spans: a group's positions are consecutive
        for k in row.unique()[1:]:
            pos = (row == k).nonzero().squeeze(-1)
            assert (pos.diff() == 1).all()


@pytest.mark.parametrize("order, size", [("random", 1), ("random", 2), ("random-blocks", 3)])
def test_per_row_generators_give_each_row_its_own_order(order, size):
    """With one generator per row, a row's groups are those of the row alone (no padding) with its
    generator: padding on either side and the other rows change nothing."""
    rows = [
        [0, 1, 1, 1, 0, 1, 1],
        [1, 1, 1, 1, 1],
        [0, 1, 1, 0, 1, 1, 1, 1, 1],
    ]  # 1 = to fill; 7 / 5 / 9 long
    gen = lambda b: torch.Generator().manual_seed(10 + b)  # noqa: E731
    fill = torch.zeros(3, 11, dtype=torch.bool)
    for b, r in enumerate(rows):  # row 0 left-padded, the others right-padded
        start = 11 - len(r) if b == 0 else 0
        fill[b, start : start + len(r)] = torch.tensor(r).bool()
    batched = groups.fill_groups(fill, order, size, [gen(b) for b in range(3)])
    for b, r in enumerate(rows):
        alone = groups.fill_groups(torch.tensor([r]).bool(), order, size, [gen(b)])[0]
        assert batched[b][fill[b]].tolist() == alone[alone >= 0].tolist()
    alone = groups.fill_groups(torch.ones(1, 5, dtype=torch.bool), order, size, [gen(1)])
    assert torch.equal(alone, groups.fill_groups(torch.ones(1, 5, dtype=torch.bool), order, size, gen(1)))
    reseeded = groups.fill_groups(
        fill, order, size, [gen(0), gen(1), gen(7)]
    )  # only row 2's generator differs
    assert torch.equal(reseeded[:2], batched[:2]) and not torch.equal(reseeded[2], batched[2])
    with pytest.raises(ValueError, match="got 2 for 3 rows"):
        groups.fill_groups(fill, order, size, [gen(0), gen(1)])


def test_predictable_is_everything_after_the_earliest_group():
    g = torch.tensor([[2, 5, 2, 7, PAD]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    assert groups.predictable(g, mask).tolist() == [[False, True, False, True, False]]


@pytest.mark.parametrize(
    "group_ids, mask, kwargs, error, match",
    [
        (torch.tensor([0.0, 1.0]), None, {}, TypeError, "integer"),
        (torch.tensor([[0.0, 1.0]]), None, {}, TypeError, "integer"),
        (torch.tensor([0, 1]), None, {}, ValueError, r"\[B, N\]"),
        (torch.tensor([[0, 1, 2]]), torch.tensor([[1, 1, 0]]), {}, ValueError, "group ids on padding"),
        (torch.tensor([[0, -3, 1]]), None, {}, ValueError, "negative group id"),
        (torch.tensor([[PAD, PAD]]), torch.tensor([[0, 0]]), {}, ValueError, "no real tokens"),
        (
            torch.tensor([[0, 1]]),
            None,
            {"input_ids": torch.zeros(2, 2, dtype=torch.long)},
            ValueError,
            "batch size",
        ),
        (
            torch.tensor([[0, 1]]),
            None,
            {"input_ids": torch.zeros(1, 3, dtype=torch.long)},
            ValueError,
            "shape",
        ),
        (
            torch.tensor([[0, 0, 1]]),
            None,
            {"targets": torch.tensor([[False, True, True]])},
            ValueError,
            "not predictable",
        ),
    ],
)
def test_validation_errors(group_ids, mask, kwargs, error, match):
    with pytest.raises(error, match=match):
        groups.validate_group_ids(group_ids, mask, **kwargs)


def test_bad_builder_arguments():
    mask = torch.ones(1, 4)
    with pytest.raises(ValueError, match="group size"):
        groups.contiguous(mask, 0)
    with pytest.raises(ValueError, match="unknown order"):
        groups.build("sideways", mask)
    with pytest.raises(ValueError, match="order must be one of"):  # a name where a permutation has no meaning
        groups.check_order(torch.tensor([1, 0]), named=True)
    with pytest.raises(ValueError, match="at least one known"):
        groups.infill_groups(torch.zeros(1, 4))


def test_model_rejects_bad_inputs(a3_model):
    ids = torch.randint(3, 32, (2, 6))
    with pytest.raises(ValueError, match=r"input_ids must be \[B, N\]"):
        a3_model(input_ids=ids[0])
    with pytest.raises(ValueError, match="batch size"):
        a3_model(input_ids=ids, group_ids=groups.left_to_right(torch.ones(3, 6)))
    with pytest.raises(ValueError, match="attention_mask"):
        a3_model(input_ids=ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="group ids on padding"):
        mask = torch.ones_like(ids)
        mask[:, -1] = 0
        a3_model(input_ids=ids, attention_mask=mask, group_ids=groups.left_to_right(torch.ones_like(ids)))
    with pytest.raises(ValueError, match="exceed the model's maximum"):
        long_ids = torch.randint(3, 32, (1, a3_model.config.text_config.max_position_embeddings + 1))
        a3_model(input_ids=long_ids)
    with pytest.raises(ValueError, match="no predictable target"):
        a3_model(input_ids=ids, labels=torch.full_like(ids, -100))
    with pytest.raises(ValueError, match="not predictable"):  # BOS asked for as a target
        sequence_logprobs(
            a3_model, ids, groups.left_to_right(torch.ones_like(ids)), target_mask=torch.ones_like(ids).bool()
        )

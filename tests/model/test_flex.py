"""The FlexAttention path (group-sorted positions, BlockMask) equals the dense SDPA reference."""

import pytest
import torch

from a3lm import groups
from a3lm.model.debug import CORE_FAMILIES, tiny_a3_model
from a3lm.model.masks import BlockMaskCache, flex_two_stream_block_mask, sort_by_group

# FlexAttention runs the families without sliding windows or soft-capping (the others are refused in
# one line: test_families.test_flex_refuses_windows_and_soft_caps_in_one_line)
FLEX_FAMILIES = tuple(f for f in CORE_FAMILIES if f != "gemma2")


@pytest.fixture(params=FLEX_FAMILIES)
def a3_model(request):
    return tiny_a3_model(request.param)


@pytest.mark.parametrize("query_self", [True, False])
@pytest.mark.parametrize("order", ["left-to-right", "random", "random-blocks"])
def test_flex_equals_sdpa(a3_model, order, query_self):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, -4:] = 0  # right padding
    group_ids = groups.build(order, mask, size=2, generator=gen)
    labels = ids.masked_fill(mask == 0, -100)

    a3_model.config.query_self_attention = query_self  # read at every forward

    def run(backend):  # forward only: torch has no FlexAttention backward on CPU
        a3_model.config.attention_backend = backend
        with torch.no_grad():
            return a3_model(
                input_ids=ids,
                group_ids=group_ids,
                attention_mask=mask,
                labels=labels,
                output_content_hidden_states=True,
            )

    ref, got = run("sdpa"), run("flex")
    targets = groups.predictable(group_ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got.logits[targets], ref.logits[targets], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        got.content_hidden_states[real], ref.content_hidden_states[real], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-6, rtol=0)


@pytest.mark.parametrize("n", [12, 128])
def test_flex_with_a_grouping_every_sample_shares(a3_model, n):
    # one BlockMask row broadcast over the batch: the kernel still asks it with every sample's index
    ids = torch.randint(3, 32, (3, n), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    group_ids = groups.contiguous(mask, 2)

    def run(backend):
        a3_model.config.attention_backend = backend
        with torch.no_grad():
            return a3_model(input_ids=ids, group_ids=group_ids, attention_mask=mask).logits

    targets = groups.predictable(group_ids, mask)
    torch.testing.assert_close(run("flex")[targets], run("sdpa")[targets], atol=1e-5, rtol=1e-5)


def test_reordering_back_to_positions_has_the_gather_gradient():
    """`Reorder` (the flex path's way back from group-sorted rows): Tensor.gather's values and gradient."""
    from a3lm.model.modeling import Reorder

    gen = torch.Generator().manual_seed(0)
    perm = torch.stack([torch.randperm(7, generator=gen) for _ in range(3)])
    inverse = perm.argsort(dim=1)
    x = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    ref = x.gather(1, inverse[..., None].expand(-1, -1, 5))
    got = Reorder.apply(x, inverse, perm)
    assert torch.equal(got, ref)
    weights = torch.randn(3, 7, 5, dtype=torch.float64)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), x)
    (got_grad,) = torch.autograd.grad((got * weights).sum(), x)
    assert torch.equal(got_grad, ref_grad)


def test_sort_by_group_puts_padding_last_and_groups_in_order():
    g = torch.tensor([[groups.PAD_GROUP, 0, 2, 1, 2]])
    mask = torch.tensor([[0, 1, 1, 1, 1]])
    assert sort_by_group(g, mask).tolist() == [[1, 3, 2, 4, 0]]


def test_shared_grouping_reuses_one_block_mask_from_its_owners_cache():
    mask = torch.ones(4, 16, dtype=torch.long)
    g = groups.contiguous(mask, 2)
    cache = BlockMaskCache(capacity=2)
    first = flex_two_stream_block_mask(g, mask, cache=cache)
    assert flex_two_stream_block_mask(g.clone(), mask, cache=cache) is first
    assert first.shape[0] == 1  # broadcast over the batch
    assert flex_two_stream_block_mask(g, mask, query_self=False, cache=cache) is not first
    assert flex_two_stream_block_mask(g, mask) is not first  # no cache, no state kept anywhere
    assert flex_two_stream_block_mask(g, mask, cache=BlockMaskCache()) is not first  # caches are not shared
    other = groups.random_order(mask, 2, torch.Generator().manual_seed(0))
    assert (
        flex_two_stream_block_mask(other, mask, cache=cache).shape[0] == 4
    )  # per-sample groupings: not cached
    assert len(cache) == 2
    flex_two_stream_block_mask(groups.left_to_right(mask), mask, cache=cache)  # a third shared grouping
    assert (
        len(cache) == 2 and flex_two_stream_block_mask(g, mask, cache=cache) is not first
    )  # the oldest went


def test_unknown_backend_is_an_error():
    from a3lm import A3Config

    with pytest.raises(ValueError, match="attention_backend"):
        A3Config(text_config={"model_type": "llama"}, attention_backend="xformers")

"""The fused two-stream attention kernel equals the dense reference, outputs and gradients."""

import pytest
import torch

from a3lm import groups
from a3lm.model.attention import TwoStreamAttention, dense_two_stream_reference, two_stream_flash
from a3lm.model.masks import (
    additive_mask,
    group_attention_mask,
    own_slot_mask,
    row_chunks,
    sort_by_group,
    two_stream_mask,
)


def padded_groups(B: int, N: int, gen: torch.Generator):
    mask = torch.ones(B, N, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, -4:] = 0  # right padding
    return groups.random_order(mask, 3, gen), mask


def attention_inputs(B, H, G, R, K, S, D, gen):
    """query [B, H, R, D]; key/value [B, G, K + S, D], in HF's [B, L, H, D] memory layout."""

    def make(heads, length):
        x = torch.randn(B, length, heads, D, generator=gen).transpose(1, 2)
        return x.requires_grad_()

    return make(H, R), make(G, K + S), make(G, K + S)


def cached_step_mask(B: int, K: int, C: int, S: int, gen: torch.Generator) -> torch.Tensor:
    """[B, 1, C + S, K]: C content rows (the last C keys, new this step) and S query slots above every
    group, over K keys of random groups, the first two keys of row 0 invalid (padding)."""
    key_groups = torch.randint(0, 4, (B, K), generator=gen)
    key_valid = torch.ones(B, K, dtype=torch.bool)
    key_valid[0, :2] = False
    row_groups = torch.cat([key_groups[:, -C:], torch.full((B, S), 4)], dim=1)
    strict = torch.tensor([False] * C + [True] * S).expand(B, -1)
    return group_attention_mask(row_groups, strict, key_groups, key_valid)


def fused_and_dense(query, key, value, mask, n_self, scale, chunks=None):
    outs = {}
    bias = additive_mask(mask, query.dtype)
    for name, run in (
        ("fused", lambda: TwoStreamAttention.apply(query, key, value, bias, n_self, scale, chunks)),
        ("dense", lambda: dense_two_stream_reference(query, key, value, mask, n_self, scale, 0.0)),
    ):
        out = run()
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad((out * weight).sum(), (query, key, value))
        outs[name] = (out, *grads)
    return outs["fused"], outs["dense"]


@pytest.mark.parametrize("query_self", [True, False])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4)])
def test_fused_training_attention_equals_dense(query_self, heads):
    """Training shape: rows [content ; query] (2N), content keys (N) and, with the own slot, N query slots."""
    gen = torch.Generator().manual_seed(0)
    B, N, D = 3, 11, 8
    group_ids, pad = padded_groups(B, N, gen)
    mask = two_stream_mask(group_ids, pad)
    S = N if query_self else 0
    query, key, value = attention_inputs(B, heads[0], heads[1], 2 * N, N, S, D, gen)
    fused, dense = fused_and_dense(query, key, value, mask, S, D**-0.5)
    real_rows = torch.cat([pad, pad], dim=1).bool()  # padded rows feed nothing (they see the first key alone)
    torch.testing.assert_close(
        fused[0].transpose(1, 2)[real_rows], dense[0].transpose(1, 2)[real_rows], atol=1e-5, rtol=1e-5
    )
    for got, ref, name in zip(fused[1:], dense[1:], ("query", "key", "value"), strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=name)


def test_fused_cached_step_attention_equals_dense():
    """Cached-step shape: more content keys than content rows (cached + new), then the query slots."""
    gen = torch.Generator().manual_seed(2)
    B, K, C, S, D = 2, 9, 2, 3, 8
    mask = cached_step_mask(B, K, C, S, gen)
    query, key, value = attention_inputs(B, 4, 2, C + S, K, S, D, gen)
    fused, dense = fused_and_dense(query, key, value, mask, S, 0.3)
    for got, ref, name in zip(fused, dense, ("out", "query", "key", "value"), strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=name)


@torch.no_grad()
def test_own_slots_as_masked_keys_equal_the_merged_own_slot():
    """A decoding step's form: the query slots' own keys covered by the mask (`own_slot_mask`, one
    kernel call, no own-slot merge) gives the merged form's output, on the fused CPU kernel and on the
    dense path (the one CUDA decoding takes)."""
    gen = torch.Generator().manual_seed(3)
    B, K, C, S, D = 2, 9, 2, 3, 8
    mask = cached_step_mask(B, K, C, S, gen)
    wide = torch.cat([mask, own_slot_mask(C, S).expand(B, 1, -1, -1)], dim=-1)
    query, key, value = attention_inputs(B, 4, 2, C + S, K, S, D, gen)
    merged = dense_two_stream_reference(query, key, value, mask, S, 0.3, 0.0)
    for got in (
        two_stream_flash(query, key, value, additive_mask(wide, query.dtype), 0, 0.3)[0],
        dense_two_stream_reference(query, key, value, wide, 0, 0.3, 0.0),
    ):
        torch.testing.assert_close(got, merged, atol=1e-5, rtol=1e-5)


def test_fused_attention_under_cpu_autocast(a3_model):
    """bf16 autocast (q, k leave RoPE in fp32, v in bf16): the kernel runs in bf16, close to fp32."""
    ids = torch.randint(3, 32, (2, 12), generator=torch.Generator().manual_seed(0))
    group_ids = groups.random_order(torch.ones_like(ids), 2, torch.Generator().manual_seed(0))
    ref = a3_model(input_ids=ids, group_ids=group_ids, labels=ids).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = a3_model(input_ids=ids, group_ids=group_ids, labels=ids).loss
    loss.backward()
    assert abs(loss.item() - ref.item()) < 0.05
    assert torch.isfinite(a3_model.query_embed.grad).all()


def sorted_two_stream_mask(B: int, N: int, gen: torch.Generator) -> torch.Tensor:
    """The training mask [B, 1, 2N, N] over group-sorted positions (padding last), as the CPU path
    builds it."""
    group_ids, pad = padded_groups(B, N, gen)
    perm = sort_by_group(group_ids, pad)
    return two_stream_mask(group_ids.gather(1, perm), pad.gather(1, perm))


def test_row_chunks_cover_every_visible_key_and_no_more():
    mask = sorted_two_stream_mask(3, 23, torch.Generator().manual_seed(0))
    chunks = row_chunks(mask, 8)
    assert [(r0, r1) for r0, r1, _ in chunks] == [(r0, min(r0 + 8, 46)) for r0 in range(0, 46, 8)]
    for r0, r1, n in chunks:
        rows = mask[:, 0, r0:r1]
        assert not rows[..., n:].any()  # nothing visible is cut off
        assert rows[..., n - 1].any()  # and the prefix is no longer than it must be
    assert max(n for *_, n in chunks[:2]) < 23  # sorted: the earliest groups' rows see a short prefix


def test_rows_with_nothing_to_see_are_opened_to_the_first_key_alone():
    """Padding rows and the earliest group's query slots see no key: they get the first key alone
    (a finite softmax, and a short key prefix for `row_chunks`); every other row is as the groups say."""
    one_group = two_stream_mask(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4))[0, 0]
    assert one_group[:4].all()  # content rows of one group see each other
    assert one_group[4:].tolist() == [[True, False, False, False]] * 4  # no query slot sees a key
    mask = two_stream_mask(torch.tensor([[0, 1, groups.PAD_GROUP]]), torch.tensor([[1, 1, 0]]))[0, 0]
    first_only = [True, False, False]
    # rows: content of groups 0, 1 and padding, then the query slots of the same positions
    assert mask.tolist() == [first_only, [True, True, False], first_only, first_only, first_only, first_only]


@pytest.mark.parametrize("query_self", [True, False])
def test_fused_attention_by_row_chunks_equals_one_call(query_self):
    """Chunks of rows, each over its key prefix: the same outputs and gradients as one kernel call."""
    gen = torch.Generator().manual_seed(3)
    B, N, D = 3, 37, 8
    mask = sorted_two_stream_mask(B, N, gen)
    S = N if query_self else 0
    query, key, value = attention_inputs(B, 4, 2, 2 * N, N, S, D, gen)
    chunks = row_chunks(mask, 10)
    assert sum(n for *_, n in chunks) < len(chunks) * N  # some keys are skipped
    whole, _ = fused_and_dense(query, key, value, mask, S, D**-0.5)
    chunked, _ = fused_and_dense(query, key, value, mask, S, D**-0.5, chunks)
    for got, ref, name in zip(chunked, whole, ("out", "query", "key", "value"), strict=True):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():
        bias = additive_mask(mask, query.dtype)
        torch.testing.assert_close(
            two_stream_flash(query, key, value, bias, S, D**-0.5, chunks)[0], whole[0], atol=1e-6, rtol=1e-5
        )

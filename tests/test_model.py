"""Exactness of the two-stream model: base equivalence, no leakage, normalisation, padding, save/load."""

import itertools
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from a3lm import A3ForCausalLM, groups, sequence_logprobs
from a3lm.debug import tiny_a3_model, tiny_base_model

BOS = 1


def random_ids(batch: int, length: int, vocab: int = 32, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = BOS
    return ids


def test_content_stream_equals_base_model(base_and_a3):
    base, a3 = base_and_a3
    ids = random_ids(3, 12)
    out = a3(input_ids=ids, output_content_hidden_states=True)
    ref = base.model(input_ids=ids).last_hidden_state
    assert out.content_hidden_states.shape == ref.shape
    torch.testing.assert_close(out.content_hidden_states, ref, atol=1e-5, rtol=0)


def test_left_to_right_query_stream_is_a_real_distribution(a3_model):
    ids = random_ids(2, 10)
    logits = a3_model(input_ids=ids).logits
    assert logits.shape == (2, 10, a3_model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("size", [1, 2, 3])
def test_no_leakage(a3_model, size):
    """Perturbing token j changes the query logits at i iff group(j) < group(i)."""
    n = 9
    ids = random_ids(1, n, seed=size)
    mask = torch.ones_like(ids)
    gen = torch.Generator().manual_seed(size)
    for trial in range(2):
        group_ids = groups.random_order(mask, size, gen, blocks=bool(trial))
        logits = a3_model(input_ids=ids, group_ids=group_ids).logits
        for j in range(n):
            perturbed = ids.clone()
            perturbed[0, j] = 3 + (int(ids[0, j]) - 3 + 7) % 29
            diff = (a3_model(input_ids=perturbed, group_ids=group_ids).logits - logits).abs().amax(-1)[0]
            targets = groups.predictable(group_ids, mask)[0]  # the earliest group's rows predict nothing
            expected = group_ids[0, j] < group_ids[0]
            assert torch.equal((diff > 1e-6)[targets], expected[targets]), f"j={j} groups={group_ids.tolist()}"
            assert (diff[targets & ~expected] == 0).all()


def all_sequences(vocab: int, length: int) -> torch.Tensor:
    seqs = torch.tensor(list(itertools.product(range(vocab), repeat=length)))
    return torch.cat([torch.full((len(seqs), 1), BOS), seqs], dim=1)


@pytest.mark.parametrize("length", [3, 4])
@pytest.mark.parametrize("order", ["ar", "right-to-left", "two-groups", "random-pairs"])
def test_probabilities_sum_to_one(family, length, order):
    vocab = 4
    model = tiny_a3_model(family, vocab_size=vocab, bos_token_id=BOS, eos_token_id=2, pad_token_id=0)
    ids = all_sequences(vocab, length)
    mask = torch.ones_like(ids)
    if order == "ar":
        group_ids = groups.left_to_right(mask)
    elif order == "right-to-left":
        group_ids = groups.right_to_left(mask)
    elif order == "two-groups":  # one masked-diffusion step: BOS, then everything at once
        group_ids = groups.left_to_right(mask, size=length)
    else:  # one fixed random order (the same for every sequence) of groups of 2
        one = groups.random_order(mask[:1], 2, torch.Generator().manual_seed(3))
        group_ids = one.expand_as(ids)
    total = sequence_logprobs(model, ids, group_ids).total.double().exp().sum()
    assert abs(float(total) - 1.0) < 1e-5


def test_different_orders_are_different_models(a3_model):
    ids = random_ids(1, 8)
    mask = torch.ones_like(ids)
    ltr = sequence_logprobs(a3_model, ids, groups.left_to_right(mask)).total
    rtl = sequence_logprobs(a3_model, ids, groups.right_to_left(mask)).total
    assert not torch.allclose(ltr, rtl)


def pad_rows(ids: torch.Tensor, group_ids: torch.Tensor, width: int, side: str):
    """Place each (unpadded) row into a padded row of `width`, on the given side."""
    B, n = ids.shape
    out_ids = torch.zeros(B, width, dtype=torch.long)
    out_groups = torch.full((B, width), groups.PAD_GROUP, dtype=torch.long)
    mask = torch.zeros(B, width, dtype=torch.long)
    span = slice(width - n, width) if side == "left" else slice(0, n)
    out_ids[:, span], out_groups[:, span], mask[:, span] = ids, group_ids, 1
    return out_ids, out_groups, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_invariance(a3_model, side):
    gen = torch.Generator().manual_seed(0)
    rows = [random_ids(1, n, seed=n) for n in (5, 9, 7)]
    width = 11
    batch_ids, batch_groups, batch_mask, refs = [], [], [], []
    for ids in rows:
        g = groups.random_order(torch.ones_like(ids), 2, gen)
        refs.append(sequence_logprobs(a3_model, ids, g).token[0])
        i, gg, m = pad_rows(ids, g, width, side)
        batch_ids.append(i), batch_groups.append(gg), batch_mask.append(m)
    lp = sequence_logprobs(a3_model, torch.cat(batch_ids), torch.cat(batch_groups), torch.cat(batch_mask))
    for b, ref in enumerate(refs):
        n = ref.numel()
        got = lp.token[b, width - n :] if side == "left" else lp.token[b, :n]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        assert int(lp.count[b]) == n - 1


def test_loss_matches_logprobs_and_ignores_context(a3_model):
    ids = random_ids(2, 8)
    mask = torch.ones_like(ids)
    group_ids = groups.random_order(mask, 2, torch.Generator().manual_seed(1))
    out = a3_model(input_ids=ids, group_ids=group_ids, labels=ids)
    lp = sequence_logprobs(a3_model, ids, group_ids)
    assert int(out.num_targets) == 2 * 7  # BOS (the earliest group) carries no loss
    torch.testing.assert_close(out.loss, -lp.total.sum() / lp.count.sum(), atol=1e-6, rtol=0)


def test_query_vector_gets_gradient(a3_model):
    ids = random_ids(2, 6)
    a3_model(input_ids=ids, labels=ids).loss.backward()
    assert a3_model.query_embed.grad is not None and a3_model.query_embed.grad.abs().sum() > 0


def test_save_load_round_trip(a3_model, tmp_path):
    ids = random_ids(2, 8)
    group_ids = groups.random_order(torch.ones_like(ids), 2, torch.Generator().manual_seed(0))
    ref = a3_model(input_ids=ids, group_ids=group_ids).logits
    a3_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    for loaded in (A3ForCausalLM.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert isinstance(loaded, A3ForCausalLM)
        torch.testing.assert_close(loaded.eval()(input_ids=ids, group_ids=group_ids).logits, ref, atol=0, rtol=0)


def test_plain_checkpoint_adds_only_the_query_vector(family, tmp_path):
    base = tiny_base_model(family, tie_word_embeddings=family == "qwen2")
    base.save_pretrained(tmp_path)
    model, info = A3ForCausalLM.from_pretrained(tmp_path, output_loading_info=True, low_cpu_mem_usage=True)
    assert info["missing_keys"] == {"query_embed"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    emb_std = float(model.get_input_embeddings().weight.detach().std())
    assert 0.5 * emb_std < float(model.query_embed.detach().std()) < 2 * emb_std  # at the embeddings' scale
    ids = random_ids(2, 7)
    hidden = model.eval()(input_ids=ids, output_content_hidden_states=True).content_hidden_states
    torch.testing.assert_close(hidden, base.model(input_ids=ids).last_hidden_state, atol=1e-5, rtol=0)


def test_missing_and_corrupt_checkpoints(a3_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder"):
        A3ForCausalLM.from_pretrained(tmp_path / "nowhere")
    a3_model.save_pretrained(tmp_path)
    weights = Path(tmp_path / "model.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="corrupt checkpoint"):
        A3ForCausalLM.from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(OSError, match="model.safetensors"):
        A3ForCausalLM.from_pretrained(tmp_path)


def test_skipping_the_last_content_mlp_leaves_queries_exact(a3_model):
    """The content stream's last MLP is skipped unless its states are asked for: queries are unchanged."""
    ids = random_ids(2, 9)
    group_ids = groups.random_order(torch.ones_like(ids), 2, torch.Generator().manual_seed(0))
    fast = a3_model(input_ids=ids, group_ids=group_ids).logits
    full = a3_model(input_ids=ids, group_ids=group_ids, output_content_hidden_states=True).logits
    torch.testing.assert_close(fast, full, atol=1e-6, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients(a3_model):
    ids = random_ids(2, 9)
    group_ids = groups.random_order(torch.ones_like(ids), 2, torch.Generator().manual_seed(0))
    a3_model.train()

    def grads():
        a3_model.zero_grad(set_to_none=True)
        a3_model(input_ids=ids, group_ids=group_ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in a3_model.named_parameters() if p.grad is not None}

    ref = grads()
    a3_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    got = grads()
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("query_self", [True, False])
def test_query_behind_bos_alone_knows_its_position(family, query_self):
    """One content key (BOS) visible: only the query's own slot lets RoPE tell positions apart."""
    from a3lm import A3Config

    base = tiny_base_model(family)
    cfg = A3Config(text_config=base.config.to_dict(), query_self_attention=query_self)
    model = A3ForCausalLM(cfg)
    model.load_state_dict(A3ForCausalLM.from_base(base).state_dict())
    ids = random_ids(1, 6)
    two_groups = groups.left_to_right(torch.ones_like(ids), size=5)  # BOS, then everything at once
    logits = model.eval()(input_ids=ids, group_ids=two_groups).logits[0, 1:]
    spread = (logits - logits[:1]).abs().amax()
    assert (spread > 1e-4) if query_self else (spread < 1e-6)
    # probabilities still chain to one, and nothing leaks, with or without the self slot
    lp = sequence_logprobs(model, all_sequences(4, 2).clamp(max=31), groups.left_to_right(torch.ones(16, 3), 1))
    assert torch.isfinite(lp.total).all()

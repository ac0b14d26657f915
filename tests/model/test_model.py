"""Exactness of the two-stream model: base equivalence, no leakage, normalisation, padding, save/load."""

import contextlib
import itertools
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from a3lm import A3ForCausalLM, groups, sequence_logprobs
from a3lm.model.debug import tiny_a3_model, tiny_base_model
from a3lm.model.families import sliding_window

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


def all_sequences(vocab: int, length: int) -> torch.Tensor:
    """Every sequence BOS + `length` tokens over the vocabulary [vocab**length, 1 + length], the last
    token varying fastest (so [..., vocab] blocks differ in the last token only)."""
    seqs = torch.tensor(list(itertools.product(range(vocab), repeat=length)))
    return torch.cat([torch.full((len(seqs), 1), BOS), seqs], dim=1)


def tiny_vocab_model(family: str, query_self: bool, vocab: int = 4) -> A3ForCausalLM:
    """A tiny A3 model over `vocab` tokens, small enough to enumerate every sequence."""
    model = tiny_a3_model(family, vocab_size=vocab, bos_token_id=BOS, eos_token_id=2, pad_token_id=0)
    model.config.query_self_attention = query_self
    return model


def joint_probabilities(model: A3ForCausalLM, length: int, order: str) -> torch.Tensor:
    """p(x) under `order` for every sequence of `all_sequences(V, length)` [V**length], float64."""
    ids = all_sequences(model.config.text_config.vocab_size, length)
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
    return sequence_logprobs(model, ids, group_ids).total.double().exp()


@pytest.mark.parametrize("query_self", [True, False])
def test_left_to_right_query_stream_is_a_real_distribution(core_family, query_self):
    """Row i is p(x_i | x_<i) and nothing else: summing the joint of length-4 sequences over the last
    token gives, to float precision, the joint a forward over the length-3 sequences alone computes."""
    model = tiny_vocab_model(core_family, query_self)
    joint = joint_probabilities(model, 4, "ar")
    shorter = joint_probabilities(model, 3, "ar")
    torch.testing.assert_close(joint.view(-1, 4).sum(-1), shorter, atol=1e-7, rtol=1e-5)
    assert (
        float(shorter.max() / shorter.min()) > 1.5
    )  # not the uniform distribution: the numbers mean something


@pytest.mark.parametrize("query_self", [True, False])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_no_leakage(core_a3_model, size, query_self):
    """Perturbing token j changes the query logits at i iff group(j) < group(i); perturbing every token
    of groups >= k at once leaves the rows of groups <= k bit-for-bit unchanged. With sliding windows
    (the debug window, 4, is narrower than the rows' reach over 2 layers), "only if": a change never
    reaches a row it must not, and reaches some row."""
    core_a3_model.config.query_self_attention = query_self
    windowed = sliding_window(core_a3_model.config.text_config) is not None
    n = 9
    ids = random_ids(1, n, seed=size)
    mask = torch.ones_like(ids)
    gen = torch.Generator().manual_seed(size)

    def logit_change(perturb: torch.Tensor, group_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Largest change [N] of each row's logits when the tokens at `perturb` [N] change."""
        perturbed = ids.clone()
        perturbed[0, perturb] = 3 + (ids[0, perturb] - 3 + 7) % 29
        return (core_a3_model(input_ids=perturbed, group_ids=group_ids).logits - logits).abs().amax(-1)[0]

    for trial in range(2):
        group_ids = groups.random_order(mask, size, gen, blocks=bool(trial))
        logits = core_a3_model(input_ids=ids, group_ids=group_ids).logits
        targets = groups.predictable(group_ids, mask)[0]  # the earliest group's rows predict nothing
        for j in range(n):
            diff = logit_change(torch.arange(n) == j, group_ids, logits)
            expected = group_ids[0, j] < group_ids[0]
            changed = (diff > 1e-6)[targets]
            if not windowed:
                assert torch.equal(changed, expected[targets]), f"j={j} groups={group_ids.tolist()}"
            assert (diff[targets & ~expected] == 0).all()
        for k in range(1, int(group_ids.max()) + 1):
            diff = logit_change(group_ids[0] >= k, group_ids, logits)
            assert (diff[targets & (group_ids[0] <= k)] == 0).all(), f"k={k} groups={group_ids.tolist()}"
            assert windowed or (diff[group_ids[0] > k] > 1e-6).all(), f"k={k} groups={group_ids.tolist()}"


@pytest.mark.parametrize("query_self", [True, False])
@pytest.mark.parametrize("length", [3, 4])
@pytest.mark.parametrize("order", ["ar", "right-to-left", "two-groups", "random-pairs"])
def test_probabilities_sum_to_one(core_family, length, order, query_self):
    """With or without the own slot, every factorization is a distribution over all sequences."""
    total = joint_probabilities(tiny_vocab_model(core_family, query_self), length, order).sum()
    assert abs(float(total) - 1.0) < 1e-5


def test_different_orders_are_different_models(core_a3_model):
    ids = random_ids(1, 8)
    mask = torch.ones_like(ids)
    ltr = sequence_logprobs(core_a3_model, ids, groups.left_to_right(mask)).total
    rtl = sequence_logprobs(core_a3_model, ids, groups.right_to_left(mask)).total
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
        torch.testing.assert_close(
            loaded.eval()(input_ids=ids, group_ids=group_ids).logits, ref, atol=0, rtol=0
        )


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


def test_missing_and_corrupt_checkpoints(core_a3_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder"):
        A3ForCausalLM.from_pretrained(tmp_path / "nowhere")
    core_a3_model.save_pretrained(tmp_path)
    weights = Path(tmp_path / "model.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="corrupt checkpoint"):
        A3ForCausalLM.from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(OSError, match="model.safetensors"):
        A3ForCausalLM.from_pretrained(tmp_path)


def test_skipping_the_last_layers_content_rows_leaves_queries_exact(a3_model):
    """The content rows of the last layer run only k_proj and v_proj unless their states are asked
    for: queries are unchanged (the cached-vs-recompute tests then cover the decoding step's skip)."""
    ids = random_ids(2, 9)
    group_ids = groups.random_order(torch.ones_like(ids), 2, torch.Generator().manual_seed(0))
    fast = a3_model(input_ids=ids, group_ids=group_ids).logits
    full = a3_model(input_ids=ids, group_ids=group_ids, output_content_hidden_states=True).logits
    torch.testing.assert_close(fast, full, atol=1e-6, rtol=0)


def test_last_layer_runs_its_content_rows_only_through_k_and_v(a3_model):
    """Unless content states are asked for, the last layer's q_proj, o_proj and MLP see only the
    query half (its content rows feed nothing but their keys and values); every other layer sees all."""
    ids = random_ids(2, 9)
    group_ids = groups.random_order(torch.ones_like(ids), 2, torch.Generator().manual_seed(0))
    rows: dict[str, int] = {}
    layers = a3_model.model.layers
    # Phi-3's fused qkv_proj computes every row (k and v need them); its o_proj and MLP are skipped
    k_proj = "self_attn.k_proj" if hasattr(layers[0].self_attn, "k_proj") else "self_attn.qkv_proj"
    q_proj = ("self_attn.q_proj",) if hasattr(layers[0].self_attn, "q_proj") else ()
    names = (*q_proj, k_proj, "self_attn.o_proj", "mlp")
    # forward hooks, not pre-hooks: they see the arguments the module ran on
    handles = [
        layers[i]
        .get_submodule(n)
        .register_forward_hook(lambda m, a, o, key=f"{i}.{n}": rows.__setitem__(key, a[0].shape[1]))
        for i in (0, len(layers) - 1)
        for n in names
    ]
    try:
        for read_content in (False, True):
            a3_model(input_ids=ids, group_ids=group_ids, output_content_hidden_states=read_content)
            last = len(layers) - 1
            assert all(rows[f"0.{n}"] == 18 for n in names)
            assert rows[f"{last}.{k_proj}"] == 18
            skipped = [n for n in names if n != k_proj]
            assert [rows[f"{last}.{n}"] for n in skipped] == [18 if read_content else 9] * len(skipped)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("query_self", [True, False])
def test_cpu_attention_by_row_chunks_over_sorted_positions_changes_nothing(
    core_a3_model, query_self, monkeypatch
):
    """From 64 positions on, the CPU forward sorts positions by group and runs attention by chunks of
    rows over their key prefixes: the loss, logits and gradients of the plain path, padding included."""
    import a3lm.model.modeling as model_module

    ids = random_ids(2, 70)
    mask = torch.ones_like(ids)
    mask[1, -9:] = 0
    group_ids = groups.random_order(mask, 3, torch.Generator().manual_seed(0))
    core_a3_model.config.query_self_attention = query_self

    def step():
        core_a3_model.zero_grad(set_to_none=True)
        labels = ids.masked_fill(mask == 0, -100)
        out = core_a3_model(input_ids=ids, group_ids=group_ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in core_a3_model.named_parameters() if p.grad is not None}

    chunks = []
    spy = model_module.row_chunks
    monkeypatch.setattr(model_module, "row_chunks", lambda *a: chunks.append(spy(*a)) or chunks[-1])
    got, got_grads = step()
    assert chunks and len(chunks[0]) > 1  # the chunked path ran
    monkeypatch.setattr(model_module, "MIN_ROW_CHUNK", 10**9)  # the plain path: one call, position order
    ref, ref_grads = step()
    assert len(chunks) == 1
    targets = groups.predictable(group_ids, mask)
    torch.testing.assert_close(got.logits[targets], ref.logits[targets], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-6, rtol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients(core_a3_model):
    ids = random_ids(2, 9)
    group_ids = groups.random_order(torch.ones_like(ids), 2, torch.Generator().manual_seed(0))
    core_a3_model.train()

    def grads():
        core_a3_model.zero_grad(set_to_none=True)
        core_a3_model(input_ids=ids, group_ids=group_ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in core_a3_model.named_parameters() if p.grad is not None}

    ref = grads()
    core_a3_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    got = grads()
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=1e-5, msg=name)


def _saved_bytes_and_grads(model: A3ForCausalLM, ids: torch.Tensor, group_ids: torch.Tensor):
    """(bytes autograd saves for backward in one training forward, the loss, every parameter's gradient)."""
    saved, weights = [], {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:  # a saved weight is the parameter itself: no memory
            saved.append(t.numel() * t.element_size())
        return t

    model.train().zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, group_ids=group_ids, labels=ids).loss
    loss.backward()
    return (
        sum(saved),
        loss.detach(),
        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
    )


def test_recomputed_mlp_gives_the_same_step_and_saves_two_activations_per_layer(a3_model):
    """recompute_mlp: identical loss and gradients; autograd keeps two [2N rows, intermediate]
    activations fewer per layer (act(gate) and act(gate) * up), less the last layer's content rows."""
    ids = random_ids(2, 9)
    group_ids = groups.random_order(torch.ones_like(ids), 2, torch.Generator().manual_seed(0))
    a3_model.config.recompute_mlp = False
    bytes_off, loss_off, ref = _saved_bytes_and_grads(a3_model, ids, group_ids)
    a3_model.config.recompute_mlp = True
    bytes_on, loss_on, got = _saved_bytes_and_grads(a3_model, ids, group_ids)
    assert torch.equal(loss_on, loss_off)
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-7, rtol=1e-6, msg=name)
    text = a3_model.config.text_config
    B, N, L, inter = ids.shape[0], ids.shape[1], text.num_hidden_layers, text.intermediate_size
    rows = B * 2 * N * L - B * N  # the last layer's MLP runs on the query half only
    assert bytes_off - bytes_on == 2 * rows * inter * 4  # fp32
    assert not any("forward" in vars(m) for m in a3_model.modules())  # the class's forward is back


@pytest.mark.parametrize("autocast", [False, True])
def test_recomputed_mlp_matches_with_a_bias_and_under_autocast(autocast):
    """`GatedDown` rebuilds down_proj's input in backward, in the dtype autocast ran it in, bias included."""
    from a3lm.model.mlp import recompute_gated_mlps

    mlp = tiny_base_model("llama", mlp_bias=True).model.layers[0].mlp
    x = torch.randn(2, 5, mlp.gate_proj.in_features, requires_grad=True)
    results = []
    for recompute in (False, True):
        mlp.zero_grad(set_to_none=True)
        x.grad = None
        recomputing = recompute_gated_mlps(mlp) if recompute else contextlib.nullcontext()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), recomputing:
            out = mlp(x)
        out.float().square().sum().backward()
        results.append([out, x.grad, *(p.grad for p in mlp.parameters())])
    assert results[0][0].dtype == (torch.bfloat16 if autocast else torch.float32)
    for got, ref in zip(results[1], results[0], strict=True):
        assert got.dtype == ref.dtype
        torch.testing.assert_close(got, ref, atol=0, rtol=0)


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
    # Granite's multipliers keep its spread near 1e-4
    assert (spread > 1e-5) if query_self else (spread < 1e-6)
    # that probabilities still chain to one and nothing leaks, with or without the own slot, is
    # test_probabilities_sum_to_one and test_no_leakage, parametrised over query_self


def test_building_an_a3_model_leaves_the_callers_config_alone(family):
    """A3Config(text_config=cfg) then A3ForCausalLM: cfg keeps its attention, and a plain model built
    from it afterwards computes what one built before did."""
    from transformers import AutoModelForCausalLM

    from a3lm import A3Config
    from a3lm.model.debug import tiny_base_config

    cfg = tiny_base_config(family)
    ids = random_ids(2, 7)
    torch.manual_seed(0)
    before = AutoModelForCausalLM.from_config(cfg).eval()
    snapshot = (cfg.to_dict(), cfg._attn_implementation)
    a3_config = A3Config(text_config=cfg)
    a3_snapshot = (a3_config.to_dict(), a3_config._attn_implementation)
    model = A3ForCausalLM(a3_config)
    assert model.config.text_config is not cfg and model.model.config._attn_implementation == "a3"
    assert (cfg.to_dict(), cfg._attn_implementation) == snapshot
    assert (a3_config.to_dict(), a3_config._attn_implementation) == a3_snapshot
    torch.manual_seed(0)
    after = AutoModelForCausalLM.from_config(cfg).eval()
    assert after.config._attn_implementation == before.config._attn_implementation
    with torch.no_grad():
        torch.testing.assert_close(after(input_ids=ids).logits, before(input_ids=ids).logits, atol=0, rtol=0)


def test_attention_implementation_is_the_two_stream_one(a3_model, tmp_path):
    """Set through the public attn_implementation argument; any other request is refused, not ignored."""
    assert a3_model.config._attn_implementation == "a3" == a3_model.model.config._attn_implementation
    with pytest.raises(ValueError, match="two-stream attention"):
        a3_model.set_attn_implementation("sdpa")
    a3_model.save_pretrained(tmp_path)
    assert A3ForCausalLM.from_pretrained(tmp_path).model.config._attn_implementation == "a3"
    with pytest.raises(ValueError, match="two-stream attention"):
        A3ForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")


def test_query_self_attention_travels_with_the_forward(family):
    """The own-slot rule is read from the config at every forward (a forward kwarg of the decoder), not
    stamped on modules at construction: flipping it on a built model equals building with it."""
    from a3lm import A3Config

    base = tiny_base_model(family)
    ids = random_ids(2, 8)
    group_ids = groups.random_order(torch.ones_like(ids), 2, torch.Generator().manual_seed(0))
    model = A3ForCausalLM.from_base(base).eval()
    built = A3ForCausalLM(A3Config(text_config=base.config.to_dict(), query_self_attention=False)).eval()
    built.load_state_dict(model.state_dict())
    with_self = model(input_ids=ids, group_ids=group_ids).logits
    model.config.query_self_attention = False
    without = model(input_ids=ids, group_ids=group_ids).logits
    assert (without - with_self).abs().amax() > 1e-4
    torch.testing.assert_close(without, built(input_ids=ids, group_ids=group_ids).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="a3_query_self_attention"):  # a bare decoder run has no rule to pick
        model.model(
            inputs_embeds=model.stream_embeds(ids, 8),
            attention_mask=torch.ones(2, 1, 16, 8, dtype=torch.bool),
        )


def test_no_split_modules_come_from_the_wrapped_decoder(a3_model):
    """FSDP wraps one unit per decoder layer, whatever the family: the layer class is the decoder's own."""
    layer_types = {type(layer).__name__ for layer in a3_model.model.layers}
    assert set(a3_model._no_split_modules) == layer_types == set(a3_model.model._no_split_modules)

"""Every supported family, on a tiny random model of its own config class: the query stream equals an
independent float64 reference (the family's own `*ForCausalLM` with transformers' eager attention over
[content ; query] rows and an explicit [2N, 2N] mask), sliding windows for every layer pattern,
soft-capping, scaled embeddings, multipliers, and the refusals."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from a3lm import A3ForCausalLM, groups
from a3lm.model.debug import DEBUG_WINDOW, FAMILIES, tiny_a3_model, tiny_base_model
from a3lm.model.families import SUPPORTED, check_supported, refusal, sliding_window
from a3lm.model.modeling import default_position_ids, uses_flex


def random_batch(n: int = 11, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [2, n] (BOS first) with the second row left-padded by 3, and its attention mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 32, (2, n), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[0, 0], ids[1, 3] = 1, 1
    return ids.masked_fill(mask == 0, 0), mask


def reference_masks(group_ids, mask, positions, window, query_self=True) -> torch.Tensor | dict:
    """[B, 1, 2N, 2N] additive float64 masks over [content ; query] keys, straight from the rule:
    content row i sees valid keys j with g_j <= g_i, query row i those with g_j < g_i and its own slot
    (query_self); a windowed layer also needs |pos_i - pos_j| < window. Rows left with nothing see
    themselves (padding, the earliest group's query slots): they feed no compared logit."""
    B, N = group_ids.shape
    g, valid = group_ids, mask.bool()
    content = (g[:, None, :] <= g[:, :, None]) & valid[:, None, :]
    query = (g[:, None, :] < g[:, :, None]) & valid[:, None, :]

    def build(win: int | None) -> torch.Tensor:
        distance = (positions[:, :, None] - positions[:, None, :]).abs()
        near = distance < win if win else torch.ones_like(content)
        c, q = content & near, query & near
        if win:  # a blind windowed row keeps its unwindowed keys (only without the own slot)
            q = torch.where(q.any(-1, keepdim=True) | query_self, q, query)
        eye = torch.eye(N, dtype=torch.bool).expand(B, N, N)
        top = torch.cat([c, torch.zeros_like(c)], dim=2)
        bottom = torch.cat([q, eye & query_self], dim=2)
        full = torch.cat([top, bottom], dim=1)
        full |= ~full.any(-1, keepdim=True) & torch.eye(2 * N, dtype=torch.bool)
        additive = torch.zeros(full.shape, dtype=torch.float64)
        return additive.masked_fill(~full, torch.finfo(torch.float64).min)[:, None]

    return (build(None), build(window))


@torch.no_grad()
def reference_query_logits(a3: A3ForCausalLM, ids, group_ids, mask) -> torch.Tensor:
    """The query stream's logits [B, N, V] from the base family's own model in float64, eager attention."""
    text = copy.deepcopy(a3.config.text_config)  # from_config sets the attention on the config it gets
    base = AutoModelForCausalLM.from_config(text, attn_implementation="eager").double().eval()
    weights = {k: v for k, v in a3.state_dict().items() if k != "query_embed"}
    missing, unexpected = base.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied heads only
    N = ids.shape[1]
    positions = default_position_ids(mask)
    content = base.get_input_embeddings()(ids)
    # Gemma scales embedding rows by sqrt(hidden): the query vector enters the same way
    scale = text.hidden_size**0.5 if text.model_type.startswith("gemma") else 1.0
    query = (a3.query_embed.double() * scale).expand(ids.shape[0], N, -1)
    full, windowed = reference_masks(group_ids, mask, positions, sliding_window(text))
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        attention_mask = {"full_attention": full, "sliding_attention": windowed}
    else:  # Mistral / Phi-3: a window, when set, is on every layer
        attention_mask = windowed if sliding_window(text) else full
    out = base(
        inputs_embeds=torch.cat([content, query], dim=1),
        attention_mask=attention_mask,
        position_ids=torch.cat([positions, positions], dim=1),
    )
    return out.logits[:, N:]


@pytest.mark.parametrize("size", [1, 3])
def test_query_stream_equals_a_float64_reference(family, size):
    """Random groupings over padded rows longer than the window: every target's logits match the family's
    own model in float64 over [content ; query] with the two-stream mask (the fused CPU kernel, or the
    dense path for soft-capped layers, against transformers' eager attention)."""
    a3 = tiny_a3_model(family)
    ids, mask = random_batch()
    group_ids = groups.random_order(mask, size, torch.Generator().manual_seed(size))
    got = a3(input_ids=ids, group_ids=group_ids, attention_mask=mask).logits
    want = reference_query_logits(a3, ids, group_ids, mask)
    targets = groups.predictable(group_ids, mask)
    torch.testing.assert_close(got[targets].double(), want[targets], atol=2e-5, rtol=1e-5)


def windowed_config(pattern: str) -> tuple[str, dict]:
    """(family, config overrides) for each layer pattern of sliding windows, on 3 layers."""
    return {
        "all-window (Mistral)": ("mistral", {"sliding_window": DEBUG_WINDOW}),
        "all-window (Phi-3)": ("phi3", {"sliding_window": DEBUG_WINDOW}),
        "alternating (Gemma 2)": ("gemma2", {"sliding_window": DEBUG_WINDOW}),
        "local-local-global (Gemma 3)": (
            "gemma3",
            {
                "sliding_window": DEBUG_WINDOW,
                "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
            },
        ),
        "first layers full (Qwen2 max_window_layers)": (
            "qwen2",
            {"use_sliding_window": True, "sliding_window": DEBUG_WINDOW, "max_window_layers": 1},
        ),
        "first layers full (Qwen3 max_window_layers)": (
            "qwen3",
            {"use_sliding_window": True, "sliding_window": DEBUG_WINDOW, "max_window_layers": 2},
        ),
    }[pattern]


@pytest.mark.parametrize(
    "pattern",
    [
        "all-window (Mistral)",
        "all-window (Phi-3)",
        "alternating (Gemma 2)",
        "local-local-global (Gemma 3)",
        "first layers full (Qwen2 max_window_layers)",
        "first layers full (Qwen3 max_window_layers)",
    ],
)
def test_content_stream_equals_the_windowed_base_past_the_window(pattern):
    """Under left-to-right singletons the content stream is the windowed base model on rows 3 windows
    long (padding included), and the window matters: the same weights with full attention differ."""
    family, overrides = windowed_config(pattern)
    base = tiny_base_model(family, num_hidden_layers=3, **overrides)
    if family in ("qwen2", "qwen3"):
        types = base.config.layer_types
        assert types[0] == "full_attention" and "sliding_attention" in types
    a3 = A3ForCausalLM.from_base(base).eval()
    ids, mask = random_batch(n=3 * DEBUG_WINDOW)
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask).logits
        out = a3(input_ids=ids, attention_mask=mask, output_content_hidden_states=True)
        got = a3.logits(out.content_hidden_states)
        config = copy.deepcopy(base.config)
        unwindowed = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        unwindowed.load_state_dict(base.state_dict())
        unwindowed.config.sliding_window = 10**6  # the window now wider than any row
        wide = unwindowed(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    assert (wide[real] - want[real]).abs().amax() > 1e-4, "the window should change the base model's logits"


def test_a_windowed_query_that_sees_only_its_own_slot_is_exact():
    """Groups that put every earlier-group key of a query outside the window (an order where a token's
    neighbours all come later): the query sees only its own slot in windowed layers, in the fused
    kernel (whose lse there must be -inf), the reference and the cached decoding alike."""
    a3 = tiny_a3_model("mistral")
    ids, mask = random_batch(n=12)
    mask[:] = 1
    # BOS first, then positions 8.. (far right), then the rest: position 1's earlier keys are 0 and 8+
    order = torch.tensor([0, 5, 6, 7, 8, 9, 10, 11, 1, 2, 3, 4])
    group_ids = order.expand(2, -1).clone()
    got = a3(input_ids=ids, group_ids=group_ids).logits
    want = reference_query_logits(a3, ids, group_ids, mask)
    targets = groups.predictable(group_ids, mask)
    torch.testing.assert_close(got[targets].double(), want[targets], atol=2e-5, rtol=1e-5)
    a3.train()  # the same through the autograd function (gradients flow)
    loss = a3(input_ids=ids, group_ids=group_ids, labels=ids).loss
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in a3.parameters() if p.grad is not None)


def test_soft_capping_bites_and_is_applied_on_the_query_rows():
    """Gemma 2's attention-logit and final soft-caps: the reference test covers their values; here the
    caps of the debug model (0.5, 1.0) must change the logits, and the final cap bounds every query logit."""
    ids, mask = random_batch()
    group_ids = groups.random_order(mask, 2, torch.Generator().manual_seed(0))
    capped = tiny_a3_model("gemma2")
    logits = capped(input_ids=ids, group_ids=group_ids, attention_mask=mask).logits.detach()
    assert float(logits.abs().max()) < 1.0
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        free = tiny_a3_model("gemma2", **{field: None})
        other = free(input_ids=ids, group_ids=group_ids, attention_mask=mask).logits
        assert (other - logits).abs().amax() > 0.05, field


def test_soft_capped_layers_run_the_dense_path(monkeypatch):
    """The fused CPU kernel cannot soft-cap: Gemma 2's layers must not reach it."""
    import a3lm.model.attention as attention

    def refuse(*args, **kwargs):
        raise AssertionError("a soft-capped layer reached the fused kernel")

    monkeypatch.setattr(attention, "two_stream_flash", refuse)
    ids, mask = random_batch()
    tiny_a3_model("gemma2")(input_ids=ids, attention_mask=mask)
    with pytest.raises(AssertionError, match="fused kernel"):
        tiny_a3_model("gemma3")(input_ids=ids, attention_mask=mask)  # no soft-cap: the fused kernel


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_scaled_embeddings_scale_the_query_vector_and_its_init(family):
    """Gemma multiplies embedding rows by sqrt(hidden): the query rows entering the decoder are w times
    the same factor, and w is drawn at the embedding weights' std, so both streams start at one scale."""
    a3 = tiny_a3_model(family)
    hidden = a3.config.text_config.hidden_size
    ids, _ = random_batch()
    rows = a3.stream_embeds(ids, 3)
    torch.testing.assert_close(rows[:, -1], a3.query_embed.detach().expand(2, -1) * hidden**0.5)
    ratio = float(rows[:, -1].std() / rows[:, :-3].std())
    assert 0.5 < ratio < 2, f"query rows at {ratio:.2f} times the content rows' scale"


def test_granite_multipliers_and_logits_scaling_reach_the_query_stream():
    """The reference test checks the values; here each multiplier must matter (a wrong placement would
    show there), and the query logits are divided by logits_scaling exactly as the base model's are."""
    ids, mask = random_batch()
    group_ids = groups.random_order(mask, 2, torch.Generator().manual_seed(0))
    model = tiny_a3_model("granite")
    logits = model(input_ids=ids, group_ids=group_ids, attention_mask=mask).logits
    model.config.text_config.logits_scaling = 1.0
    unscaled = model(input_ids=ids, group_ids=group_ids, attention_mask=mask).logits
    torch.testing.assert_close(unscaled, 2.0 * logits)


def test_every_family_is_in_the_registry_and_others_get_one_line():
    assert {tiny_base_model(f).config.model_type for f in FAMILIES} == set(SUPPORTED)
    line = refusal("gpt2")
    assert line is not None and "'gpt2'" in line and "\n" not in line and "llama" in line
    assert "gemma3_text" in refusal("gemma3")
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        A3ForCausalLM.from_base(AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=8, n_head=2)))
    with pytest.raises(ValueError, match="bidirectional"):
        check_supported(tiny_base_model("gemma3", use_bidirectional_attention=True).config)


def test_flex_refuses_windows_and_soft_caps_in_one_line():
    model = tiny_a3_model("gemma2")
    model.config.attention_backend = "flex"
    ids, mask = random_batch()
    with pytest.raises(ValueError, match="does not run gemma2's sliding windows or soft-capping"):
        model(input_ids=ids, attention_mask=mask)
    model.config.attention_backend = "auto"
    assert not uses_flex(model.config, torch.device("cuda"))  # auto: the dense path on CUDA too

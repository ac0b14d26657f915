"""The `a3lm sample` and `a3lm infill` commands on a tiny saved model."""

import pytest
import torch
from typer.testing import CliRunner

from a3lm.cli import app
from a3lm.decoding.api import load_pretrained, sample
from a3lm.model.debug import tiny_a3_model
from a3lm.tokenizer import encode_row, word_tokenizer

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "mat", ".", "a", "big"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("a3")
    tokenizer = word_tokenizer(WORDS)
    tiny_a3_model("llama", vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


def _read_picture(lines: list[str]) -> tuple[list[int], list[list[str]]]:
    """The step numbers and the shown tokens of each line of a --show-order picture ("step t: a [b] _")."""
    steps = [int(line.split(":")[0].split()[1]) for line in lines]
    return steps, [line.split(": ", 1)[1].split(" ") for line in lines]


def test_sample_shows_order(model_dir):
    res = _run(
        "sample",
        "--model",
        model_dir,
        "--prompt",
        "the cat",
        "--length",
        "6",
        "--group-size",
        "2",
        "--order",
        "random",
        "--seed",
        "1",
        "--show-order",
    )
    assert res.exit_code == 0, res.output
    *picture, text = res.stdout.strip().splitlines()
    steps, rows = _read_picture(picture)
    width = len(rows[0])  # the prompt and the generated tokens shown (special tokens are not: BOS, an EOS)
    assert rows[0] == ["the", "cat"] + ["_"] * (width - 2) and width > 2
    # 6 positions in groups of 2: steps 1..3 at most (fewer if EOS came early), in increasing order
    assert steps[0] == 0 and steps == sorted(set(steps)) and steps[-1] <= 3
    filled_at = {}
    for t, row in zip(steps, rows, strict=True):
        assert len(row) == width and row[:2] == ["the", "cat"]  # the prompt is never marked
        marked = [j for j, w in enumerate(row) if w.startswith("[") and w.endswith("]")]
        assert (1 <= len(marked) <= 2) if t else not marked
        assert not set(marked) & set(filled_at)
        filled_at.update(dict.fromkeys(marked, t))
    assert sorted(filled_at) == list(range(2, width))  # every generated token marked at exactly one step
    final = [w.strip("[]") for w in rows[-1]]
    for t, row in zip(steps, rows, strict=True):  # blank before its step, bracketed at it, plain after
        want = [
            w if j < 2 or filled_at[j] < t else f"[{w}]" if filled_at[j] == t else "_"
            for j, w in enumerate(final)
        ]
        assert row == want
    assert text == " ".join(final)
    # the same run through the Python API: the marks are its fill steps, at most 2 positions per step
    model, tokenizer = load_pretrained(model_dir)
    out = sample(
        model,
        torch.tensor([encode_row(tokenizer, "the cat")]),
        length=6,
        group_size=2,
        order="random",
        seed=1,
        eos_token_id=tokenizer.eos_token_id,
    )
    real = out.attention_mask[0].bool()
    ids, fill_step = out.sequences[0][real].tolist(), out.fill_step[0][real].tolist()
    assert [s for i, s in zip(ids, fill_step, strict=True) if i not in tokenizer.all_special_ids] == [
        0,
        0,
        *(filled_at[j] for j in range(2, width)),
    ]
    assert max(fill_step.count(t) for t in range(1, 4)) <= 2


def test_sample_cache_and_no_cache_agree(model_dir):
    args = (
        "sample",
        "--model",
        model_dir,
        "--prompt",
        "a big dog",
        "--length",
        "8",
        "--dynamic",
        "--criterion",
        "margin",
        "--per-step",
        "2",
        "--temperature",
        "0",
    )
    cached, uncached = _run(*args), _run(*args, "--no-cache")
    assert cached.exit_code == 0 and cached.stdout == uncached.stdout


def test_infill_keeps_text_around_the_blank(model_dir):
    res = _run(
        "infill", "--model", model_dir, "--text", "the cat [BLANK:3] on the mat .", "--temperature", "0"
    )
    assert res.exit_code == 0, res.output
    words = res.stdout.split()
    assert words[:2] == ["the", "cat"] and words[-4:] == ["on", "the", "mat", "."]


@pytest.mark.parametrize("schedule", ["constant", "heuristic"])
@pytest.mark.parametrize(
    "command, text", [("sample", "a big dog"), ("infill", "the cat [BLANK:4] on the mat .")]
)
def test_speculative_greedy_equals_one_token_steps(model_dir, command, text, schedule):
    flag = "--prompt" if command == "sample" else "--text"
    args = (
        command,
        "--model",
        model_dir,
        flag,
        text,
        "--temperature",
        "0",
        "--order",
        "random",
        "--show-order",
    )
    extra = ("--length", "8") if command == "sample" else ()
    plain = _run(*args, *extra)
    spec = _run(*args, *extra, "--speculative", "3", "--speculative-schedule", schedule)
    assert plain.exit_code == 0 and spec.exit_code == 0, spec.output
    # same text; the picture differs (several tokens per step)
    assert plain.stdout.splitlines()[-1] == spec.stdout.splitlines()[-1]
    assert len(spec.stdout.splitlines()) <= len(plain.stdout.splitlines())


@pytest.mark.parametrize(
    "args, message",
    [
        (("infill", "--text", "the cat [BLANK:x] sat"), "cannot parse blank spec"),
        (("sample", "--prompt", "the", "--length", "500"), "exceeds the model's maximum"),
        (("sample", "--prompt", "the", "--dynamic", "--criterion", "luck"), "unknown criterion"),
        (("sample", "--prompt", "the", "--dynamic", "--threshold", "1.5"), "threshold"),
        (("sample", "--prompt", "the", "--order", "zigzag"), "unknown order"),
        (("sample", "--prompt", "the", "--threshold", "0.9"), "dynamic decoding only"),
        (("sample", "--prompt", "the", "--per-step", "2"), "dynamic decoding only"),
        (("sample", "--prompt", "the", "--dynamic", "--group-size", "2"), "do not apply to dynamic"),
        (("infill", "--text", "the [BLANK:2]", "--dynamic", "--order", "random"), "do not apply to dynamic"),
        (("sample", "--prompt", "the", "--speculative", "2", "--group-size", "2"), "singleton groups"),
        (("sample", "--prompt", "the", "--speculative-schedule", "heuristic"), "speculative decoding only"),
    ],
)
def test_errors(model_dir, args, message):
    res = _run(args[0], "--model", model_dir, *args[1:])
    assert res.exit_code == 2 and message in res.output

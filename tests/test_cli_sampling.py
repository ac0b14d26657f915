"""The `a3lm sample` and `a3lm infill` commands on a tiny saved model."""

import pytest
from typer.testing import CliRunner

from a3lm.cli import app
from a3lm.debug import tiny_a3_model
from a3lm.tokenizer import word_tokenizer

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


def test_sample_shows_order(model_dir):
    res = _run("sample", "--model", model_dir, "--prompt", "the cat", "--length", "6", "--group-size", "2",
               "--order", "random", "--seed", "1", "--show-order")  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("step 0: the cat _")  # the row start is there, but special tokens are not shown
    assert lines[-1].startswith("the cat")
    # 6 positions in groups of 2: at most 3 steps after step 0 (fewer if EOS came early)
    assert 2 <= len(lines) <= 5


def test_sample_cache_and_no_cache_agree(model_dir):
    args = ("sample", "--model", model_dir, "--prompt", "a big dog", "--length", "8", "--dynamic",
            "--criterion", "margin", "--per-step", "2", "--temperature", "0")  # fmt: skip
    cached, uncached = _run(*args), _run(*args, "--no-cache")
    assert cached.exit_code == 0 and cached.stdout == uncached.stdout


def test_infill_keeps_text_around_the_blank(model_dir):
    res = _run("infill", "--model", model_dir, "--text", "the cat [BLANK:3] on the mat .", "--temperature", "0")
    assert res.exit_code == 0, res.output
    words = res.stdout.split()
    assert words[:2] == ["the", "cat"] and words[-4:] == ["on", "the", "mat", "."]


@pytest.mark.parametrize("command, text", [("sample", "a big dog"), ("infill", "the cat [BLANK:4] on the mat .")])
def test_speculative_greedy_equals_one_token_steps(model_dir, command, text):
    flag = "--prompt" if command == "sample" else "--text"
    args = (command, "--model", model_dir, flag, text, "--temperature", "0", "--order", "random", "--show-order")
    extra = ("--length", "8") if command == "sample" else ()
    plain, spec = _run(*args, *extra), _run(*args, *extra, "--speculative", "3")
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
    ],
)
def test_errors(model_dir, args, message):
    res = _run(args[0], "--model", model_dir, *args[1:])
    assert res.exit_code == 2 and message in res.output

"""`a3lm nll`: held-out NLL per factorization, base AR beside; the fortunes corpus; the CPU presets."""

import json

import pytest
import torch
from typer.testing import CliRunner

from a3lm.cli import app
from a3lm.data import corpora
from a3lm.evaluation.nll import FACTORIZATION_NAMES, factorizations, heldout_rows
from a3lm.model.debug import tiny_base_model
from a3lm.tokenizer import word_tokenizer
from a3lm.training.config import make_config

WORDS = ["the", "cat", "sat", "on", "mat", ".", "a", "dog", "ran"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("nll")
    tok = word_tokenizer(WORDS)
    tiny_base_model("llama", seed=2, vocab_size=len(tok)).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    assert CliRunner().invoke(app, ["convert", str(root / "base"), str(root / "a3")]).exit_code == 0
    (root / "held.txt").write_text("the cat sat on the mat .\na dog ran on the mat .\nthe dog sat .\n" * 6)
    return root


def test_factorizations_cover_the_targets_of_real_rows():
    facts = factorizations(n_rows=3, n_positions=9, n_targets=8, seed=0)
    assert [f.name for f in facts] == list(FACTORIZATION_NAMES)
    for f in facts[:-1]:
        assert f.target_mask[:, 1:].all() and not f.target_mask[:, 0].any()
        assert (f.group_ids[:, :1] < f.group_ids[:, 1:]).all(), "the row start is the earliest group"
    infill = facts[-1]
    assert infill.target_mask[0].tolist() == [False] * 3 + [True] * 4 + [False] * 2
    assert infill.group_ids[~infill.target_mask].max() < infill.group_ids[infill.target_mask].min()


def test_heldout_rows_are_training_rows_from_one_pass(dirs):
    tok = word_tokenizer(WORDS)
    rows = heldout_rows(tok, str(dirs / "held.txt"), seq_len=8, rows=1000)
    n_tokens = 6 * (8 + 8 + 5)  # tokens ("." is one) + one EOS per document
    assert rows.shape == (n_tokens // 7, 8) and (rows[:, 0] == tok.bos_token_id).all()
    stream = rows[:, 1:].flatten().tolist()
    assert stream[:9] == tok("the cat sat on the mat .", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id,
        4 + WORDS.index("a"),
    ]


def test_nll_command_scores_every_order_and_the_base(dirs, tmp_path):
    out = tmp_path / "nll.json"
    res = CliRunner().invoke(
        app,
        [
            "nll",
            "--model",
            str(dirs / "a3"),
            "--base",
            str(dirs / "base"),
            "--text",
            str(dirs / "held.txt"),
            "--seq-len",
            "8",
            "--rows",
            "5",
            "--batch-size",
            "2",
            "--output",
            str(out),
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    base, a3 = result["results"]
    assert base["kind"] == "base AR" and list(base["nll"]) == ["left-to-right"]
    assert list(a3["nll"]) == list(FACTORIZATION_NAMES) and all(v > 0 for v in a3["nll"].values())
    assert result["settings"]["targets_per_order"] == 5 * 7
    # the base row is the causal LM's own mean next-token loss on the same rows
    from transformers import AutoModelForCausalLM

    ids = heldout_rows(word_tokenizer(WORDS), str(dirs / "held.txt"), 8, 5)
    model = AutoModelForCausalLM.from_pretrained(dirs / "base").eval()
    with torch.no_grad():
        want = float(model(input_ids=ids, labels=ids).loss)
    assert base["nll"]["left-to-right"] == pytest.approx(want, rel=1e-5)
    assert "| left-to-right |" in res.output and "| infill-middle |" in res.output


def test_nll_refuses_a_plain_decoder_as_model(dirs, tmp_path):
    res = CliRunner().invoke(
        app,
        [
            "nll",
            "--model",
            str(dirs / "base"),
            "--text",
            str(dirs / "held.txt"),
            "--output",
            str(tmp_path / "x.json"),
            "--no-progress",
        ],
    )
    assert res.exit_code == 2 and "a3lm convert" in res.output


def test_fortunes_parse_and_split():
    text = "$FreeBSD$\n%\nA\tfirst   one\n  spans lines.\n%\n\n%\nSecond.\n%\n"
    assert corpora.parse_fortunes(text) == ["A first one\nspans lines.", "Second."]
    assert corpora.split_name("fortunes") == ("fortunes", "train")
    assert corpora.split_name("fortunes:heldout") == ("fortunes", "heldout")
    assert corpora.split_name("data/x.txt") is None
    with pytest.raises(ValueError, match="unknown split"):
        corpora.split_name("fortunes:test")


def test_fortunes_corpus_splits_are_disjoint(tmp_path, monkeypatch):
    try:
        corpora.fortunes_file()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    monkeypatch.setenv("A3LM_DATA_DIR", str(tmp_path))
    train = [json.loads(x)["text"] for x in corpora.corpus_file("fortunes").read_text().splitlines()]
    held = [json.loads(x)["text"] for x in corpora.corpus_file("fortunes:heldout").read_text().splitlines()]
    assert len(train) > 10_000 and 400 < len(held) < 900
    assert not set(train) & set(held) and all(corpora.is_heldout(h) for h in held)


@pytest.mark.parametrize("scale", [1.0, 0.1, 0.37, 2.0])
def test_cpu_presets_have_equal_budgets(scale):
    cur = make_config(model="m", preset="cpu", scale=scale).curriculum
    abl = make_config(model="m", preset="cpu-stage3-only", scale=scale).curriculum
    assert cur.stages == [1, 2, 3] and abl.stages == [3]
    assert abl.total_steps == cur.total_steps
    if scale == 1.0:
        assert cur.total_steps == 240
    with pytest.raises(ValueError, match="scale"):
        make_config(model="m", preset="cpu", scale=0)

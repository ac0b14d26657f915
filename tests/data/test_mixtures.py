"""Mixtures of data sources: the seeded draw, per-source order, exact resume and resharding, token counts."""

import json
import math

import pytest
import torch

from a3lm.data import synthetic
from a3lm.data.config import DataConfig, mixture_parts
from a3lm.data.loader import build_loader
from a3lm.tokenizer import word_tokenizer

HMM = synthetic.default_hmm(0)
W = HMM.words
TOK = word_tokenizer(W)
EOS = TOK.eos_token_id


def _doc(source: int, i: int) -> str:
    """Document i of source `source`: the source and i in three words, then i % 3 filler words."""
    return " ".join([W[source], W[i // len(W)], W[i % len(W)], *[W[5]] * (i % 3)])


def _write(tmp_path, source: int, n: int) -> str:
    path = tmp_path / f"s{source}.jsonl"
    path.write_text("".join(json.dumps({"text": _doc(source, i)}) + "\n" for i in range(n)))
    return str(path)


def _docs_of(tokens: list[int]) -> list[tuple[int, int]]:
    """(source, index) of every whole document (closed by EOS) of a stream that starts at a document."""
    out, start = [], 0
    for i, t in enumerate(tokens):
        if t == EOS:
            ids = [x - 4 for x in tokens[start : start + 3]]
            out.append((ids[0], ids[1] * len(W) + ids[2]))
            start = i + 1
    return out


@pytest.fixture
def two_sources(tmp_path):
    return _write(tmp_path, 0, 400), _write(tmp_path, 1, 400)


def test_mixture_specs_are_parsed_and_bad_ones_are_clear_errors(tmp_path):
    parts = mixture_parts("HuggingFaceFW/fineweb@sample-10BT:0.7,cerebras/SlimPajama-627B:0.3")
    assert [(p.source, p.name, p.weight) for p in parts] == [
        ("HuggingFaceFW/fineweb", "sample-10BT", 0.7),
        ("cerebras/SlimPajama-627B", None, 0.3),
    ]
    assert [(p.source, p.weight) for p in mixture_parts("fortunes:heldout")] == [("fortunes:heldout", 1.0)]
    assert [(p.source, p.weight) for p in mixture_parts("a.jsonl:3,fortunes:heldout:1")] == [
        ("a.jsonl", 0.75),
        ("fortunes:heldout", 0.25),
    ]
    for bad, message in (
        ("a.jsonl:0.5,b.jsonl", "'b.jsonl' of the mixture .* has no weight"),
        ("a.jsonl:0,b.jsonl:1", "weight must be a positive number"),
        ("a.jsonl:1,a.jsonl:2", "names a source twice"),
        ("synthetic:1,a.jsonl:1", "synthetic corpus .* cannot be mixed"),
    ):
        with pytest.raises(ValueError, match=message):
            DataConfig(source=bad).validate()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_loader(DataConfig(source=f"{tmp_path}/nope.jsonl:1,{tmp_path}/no.jsonl:1"), TOK)


def test_the_seeded_draw_has_the_weights_and_every_source_keeps_its_order(two_sources):
    a, b = two_sources
    cfg = DataConfig(source=f"{a}:0.7,{b}:0.3", seq_len=64, micro_batch_size=4, mixture_seed=3)
    loader = build_loader(cfg, TOK)
    stream = [t for _ in range(60) for row in loader.next_batch()["input_ids"].tolist() for t in row[1:]]
    docs = _docs_of(stream)
    n = len(docs)
    counts = [sum(s == k for s, _ in docs) for k in (0, 1)]
    # Pearson's chi-square against 0.7 / 0.3 (1 degree of freedom): below 10.83, p > 0.001
    chi2 = sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, (0.7, 0.3), strict=True))
    assert n > 1000 and chi2 < 10.83, (n, counts, chi2)
    # each source's documents come in its own order, none repeated or skipped (pass after pass)
    for k in (0, 1):
        assert [i for s, i in docs if s == k] == [j % 400 for j in range(counts[k])]
    # tokens per source: what the rows hold of each source's documents (BOS is no source's)
    held = [0, 0]
    for s, length in _doc_lengths(stream):
        held[s] += length
    assert loader.source_tokens == held and sum(held) == len(stream)
    # another seed draws another order with the same weights
    other = build_loader(DataConfig(source=cfg.source, seq_len=64, micro_batch_size=4, mixture_seed=4), TOK)
    assert not torch.equal(other.next_batch()["input_ids"], build_loader(cfg, TOK).next_batch()["input_ids"])


def _doc_lengths(stream: list[int]) -> list[tuple[int, int]]:
    """(source, tokens in the stream) of every document of a stream, the last one possibly cut."""
    out, start = [], 0
    for i in range(len(stream) + 1):
        if i == len(stream) or stream[i] == EOS:
            if start < len(stream):
                out.append((stream[start] - 4, i + (i < len(stream)) - start))
            start = i + 1
    return out


def test_a_resumed_mixture_continues_with_the_same_rows(two_sources, tmp_path):
    a, b = two_sources
    cfg = DataConfig(source=f"{a}:0.5,{b}:0.5", seq_len=9, micro_batch_size=3)
    first = build_loader(cfg, TOK)
    for _ in range(150):  # past the first pass of both sources
        first.next_batch()
    state = first.state_dict()
    # the draw stands right after the last document read: a resume redraws nothing before it
    assert (
        state["mixture"]["index"] == state["last"] + 1 > 400
        and sum(state["mixture"]["counts"]) == state["last"] + 1
    )
    torch.save(state, tmp_path / "data.pt")  # as checkpoints store it
    expected = [first.next_batch()["input_ids"] for _ in range(5)]
    resumed = build_loader(cfg, TOK)
    resumed.load_state_dict(torch.load(tmp_path / "data.pt", weights_only=False))
    assert all(torch.equal(x, resumed.next_batch()["input_ids"]) for x in expected)
    assert resumed.source_tokens == first.source_tokens
    with pytest.raises(ValueError, match="not one of the data"):
        build_loader(DataConfig(source=a, seq_len=9, micro_batch_size=3), TOK).load_state_dict(
            first.state_dict()
        )


@pytest.mark.parametrize("old_world,new_world", [(2, 1), (1, 2), (2, 3)])
def test_a_resharded_mixture_neither_repeats_nor_skips(two_sources, old_world, new_world):
    a, b = two_sources
    cfg = DataConfig(source=f"{a}:0.6,{b}:0.4", seq_len=7, micro_batch_size=1, mixture_seed=1)
    reference = build_loader(cfg, TOK)  # one rank: the mixture's document sequence itself
    sequence = _docs_of([t for _ in range(300) for t in reference.next_row()[1:]])
    end = 120  # every document of the sequence below it is read exactly once
    seen, counted = [], [0, 0]
    old = [build_loader(cfg, TOK, rank=r, world_size=old_world) for r in range(old_world)]
    for r, loader in enumerate(old):
        rows = [loader.next_row()[1:] for _ in range(30 + 5 * r)]  # ranks at different positions
        seen += _docs_of([t for row in rows for t in row] + loader.buffer)
    states = [loader.state_dict() for loader in old]
    for r in range(new_world):
        loader = build_loader(cfg, TOK, rank=r, world_size=new_world)
        loader.load_resharded(states)
        carried, tokens = len(loader.buffer), []
        while loader.last < end:
            tokens += loader.next_row()[1:]
        seen += _docs_of(tokens[carried:])
        counted = [c + n for c, n in zip(counted, loader.source_tokens, strict=True)]
    kept = [d for d in seen if d in sequence[:end]]
    assert sorted(kept) == sorted(sequence[:end]) and len(set(kept)) == len(kept)
    assert sum(counted) >= sum(sum(s["source_tokens"]) for s in states)  # old counts carried over


def test_a_mixture_of_one_weighted_source_is_that_source(two_sources):
    a, _ = two_sources
    one = build_loader(DataConfig(source=f"{a}:1", seq_len=9, micro_batch_size=2), TOK)
    plain = build_loader(DataConfig(source=a, seq_len=9, micro_batch_size=2), TOK)
    assert torch.equal(one.next_batch()["input_ids"], plain.next_batch()["input_ids"])
    assert math.isclose(mixture_parts(f"{a}:1")[0].weight, 1.0)

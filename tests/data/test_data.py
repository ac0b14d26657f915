import json

import pytest
import torch

from a3lm.data import synthetic
from a3lm.data.config import DataConfig
from a3lm.data.loader import build_loader
from a3lm.data.sources import resolve_local_files
from a3lm.demo import exact
from a3lm.tokenizer import word_tokenizer

HMM = synthetic.default_hmm(0)
TOK = word_tokenizer(HMM.words)
BOS, EOS, PAD = TOK.bos_token_id, TOK.eos_token_id, TOK.pad_token_id
DOCS = [
    "the cat sees a dog .",
    "she runs",
    "it sleeps near the river today",
    "a bird",
    "every old farmer sings",
]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    return path


def _token_stream(n_epochs: int = 3) -> list[int]:
    ids = []
    for _ in range(n_epochs):
        for d in DOCS:
            ids += TOK(d, add_special_tokens=False)["input_ids"] + [EOS]
    return ids


# -- the HMM ----------------------------------------------------------------------------------------


def test_hmm_is_a_sparse_seeded_distribution():
    assert HMM.start.dtype == HMM.trans.dtype == HMM.emit.dtype == torch.float64
    for t in (HMM.start, HMM.trans, HMM.emit):
        assert torch.allclose(t.sum(-1), torch.ones((), dtype=torch.float64))
    assert 8 <= HMM.num_states <= 12 and 30 <= HMM.vocab_size <= 60 and len(set(HMM.words)) == HMM.vocab_size
    assert (HMM.emit > 0).sum(1).max() <= 10 and (HMM.trans > 0).sum(1).max() <= 5  # sparse
    assert torch.equal(synthetic.default_hmm(0).trans, HMM.trans)
    assert not torch.equal(synthetic.default_hmm(1).trans, HMM.trans)


def test_sampled_documents_follow_the_support_and_are_reproducible():
    g = torch.Generator().manual_seed(0)
    words, states = synthetic.sample_documents(HMM, 200, 16, g, return_states=True)
    assert words.shape == (200, 16) and words.dtype == torch.long
    assert (HMM.start[states[:, 0]] > 0).all()
    assert (HMM.trans[states[:, :-1], states[:, 1:]] > 0).all()
    assert (HMM.emit[states, words] > 0).all()
    assert torch.equal(words, synthetic.sample_documents(HMM, 200, 16, torch.Generator().manual_seed(0)))
    assert synthetic.texts(HMM, words[:1])[0].split() == [HMM.words[i] for i in words[0]]
    # the exact likelihood is a proper distribution over documents of length 2
    pairs = torch.cartesian_prod(torch.arange(HMM.vocab_size), torch.arange(HMM.vocab_size))
    assert torch.isclose(exact.joint_logprob(HMM, pairs).exp().sum(), torch.tensor(1.0, dtype=torch.float64))


# -- packing ------------------------------------------------------------------------------------------


def test_synthetic_rows_are_one_document_each():
    cfg = DataConfig(seq_len=18, synthetic_length=16, micro_batch_size=4)
    loader = build_loader(cfg, TOK)
    batch = loader.next_batch()
    ids = batch["input_ids"]
    assert ids.shape == (4, 18) and bool(batch["attention_mask"].all())
    assert (ids[:, 0] == BOS).all() and (ids[:, -1] == EOS).all()
    inner = ids[:, 1:-1]
    assert not ((inner == BOS) | (inner == EOS) | (inner == PAD)).any()
    corpus = synthetic.SyntheticCorpus(HMM, 16, seed=0)
    for i in range(4):  # row i is document i of the corpus, mapped to token ids
        assert TOK.decode(ids[i, 1:-1]) == synthetic.texts(HMM, corpus[i][None])[0]


def test_packing_local_jsonl_has_bos_rows_eos_between_documents_and_no_padding(jsonl):
    cfg = DataConfig(source=str(jsonl), seq_len=7, micro_batch_size=3)
    loader = build_loader(cfg, TOK)
    rows = torch.cat([loader.next_batch()["input_ids"] for _ in range(4)])
    assert (rows[:, 0] == BOS).all() and not (rows[:, 1:] == BOS).any() and not (rows == PAD).any()
    stream = rows[:, 1:].flatten().tolist()
    assert stream == _token_stream()[: len(stream)]  # documents in order, each closed by EOS, epochs repeat


def test_folder_text_and_parquet_sources(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("the cat sees a dog\nshe runs\n")
    (folder / "sub" / "b.txt").write_text("it sleeps\n")
    builder, files = resolve_local_files(str(folder))
    assert builder == "text" and len(files) == 2
    row = build_loader(DataConfig(source=str(folder), seq_len=14, micro_batch_size=1), TOK).next_batch()[
        "input_ids"
    ][0]
    assert TOK.decode(row, skip_special_tokens=False).split() == (
        [
            "<bos>",
            "the",
            "cat",
            "sees",
            "a",
            "dog",
            "<eos>",
            "she",
            "runs",
            "<eos>",
            "it",
            "sleeps",
            "<eos>",
            "the",
        ]
    )
    import datasets

    pq = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"body": DOCS}).to_parquet(str(pq))
    loader = build_loader(DataConfig(source=str(pq), text_field="body", seq_len=5, micro_batch_size=2), TOK)
    assert loader.next_batch()["input_ids"][0, 1:].tolist() == _token_stream()[:4]


def test_resume_continues_with_the_same_rows(jsonl):
    for source in ("synthetic", str(jsonl)):
        cfg = DataConfig(source=source, seq_len=6, micro_batch_size=3)
        a = build_loader(cfg, TOK)
        for _ in range(3):
            a.next_batch()
        state = a.state_dict()
        expected = [a.next_batch()["input_ids"] for _ in range(3)]
        b = build_loader(cfg, TOK)
        b.load_state_dict(state)
        assert all(torch.equal(x, b.next_batch()["input_ids"]) for x in expected), source


def test_empty_documents_add_nothing_and_resume_exactly(tmp_path):
    txt = tmp_path / "docs.txt"  # one document per line; blank lines are empty documents
    txt.write_text("\n".join(["", DOCS[0], "", "", *DOCS[1:3], "", *DOCS[3:]]) + "\n\n")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for d in DOCS for t in (d, "", "")))
    for path in (txt, jsonl):
        cfg = DataConfig(source=str(path), seq_len=6, micro_batch_size=3)
        a = build_loader(cfg, TOK)
        stream = [t for _ in range(4) for t in a.next_batch()["input_ids"][:, 1:].flatten().tolist()]
        assert stream == _token_stream()[: len(stream)], path.name  # no EOS runs: empty documents are skipped
        state = a.state_dict()
        expected = [a.next_batch()["input_ids"] for _ in range(6)]  # across the end of the pass
        b = build_loader(cfg, TOK)
        b.load_state_dict(state)
        assert all(torch.equal(x, b.next_batch()["input_ids"]) for x in expected), path.name


def test_empty_and_textless_sources_are_clear_errors(tmp_path):
    def loader(records: list, rank: int = 0, world: int = 1):
        path = tmp_path / f"d{len(list(tmp_path.iterdir()))}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return build_loader(DataConfig(source=str(path), seq_len=4, micro_batch_size=1), TOK, rank, world)

    with pytest.raises(ValueError, match=r"every document of data source '.*d0.jsonl' is empty"):
        loader([{"text": ""}] * 3).check_readable()
    alternating = [{"text": DOCS[0]}, {"text": ""}] * 2
    assert loader(alternating, 0, 2).next_row()[1:4] == _token_stream()[:3]
    with pytest.raises(ValueError, match="every document of data source .* that rank 1 of 2 reads is empty"):
        loader(alternating, 1, 2).next_row()
    for bad in (
        {"text": None},
        {"id": 3},
    ):  # a null text; a record without the field (datasets fills in None)
        with pytest.raises(
            ValueError, match=r"d\d.jsonl': document 1 \(0-based\) has no text: its field 'text' is None"
        ):
            reader = loader([{"text": DOCS[0]}, bad, {"text": DOCS[1]}])
            for _ in range(3):  # document 0 fills the first two rows
                reader.next_row()


def test_ranks_read_disjoint_documents(jsonl):
    cfg = DataConfig(seq_len=18, micro_batch_size=8)
    r0 = build_loader(cfg, TOK, rank=0, world_size=2).next_batch()["input_ids"]
    r1 = build_loader(cfg, TOK, rank=1, world_size=2).next_batch()["input_ids"]
    one = build_loader(cfg, TOK)
    single = torch.cat([one.next_batch()["input_ids"] for _ in range(2)])
    assert torch.equal(r0, single[0::2]) and torch.equal(r1, single[1::2])
    f0 = build_loader(DataConfig(source=str(jsonl), seq_len=4, micro_batch_size=2), TOK, rank=0, world_size=2)
    f1 = build_loader(DataConfig(source=str(jsonl), seq_len=4, micro_batch_size=2), TOK, rank=1, world_size=2)
    assert not torch.equal(f0.next_batch()["input_ids"], f1.next_batch()["input_ids"])
    with pytest.raises(
        ValueError, match="cannot resume rank 0 of 1 with load_state_dict: use load_resharded"
    ):
        build_loader(cfg, TOK, rank=0, world_size=1).load_state_dict(f0.state_dict())


def test_local_folders_are_split_by_document_whatever_their_file_count(tmp_path):
    docs = _indexed_docs(10)
    for name, part in (("a.jsonl", docs[:8]), ("b.jsonl", docs[8:])):  # 2 files: a multiple of 2 ranks
        (tmp_path / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    cfg = DataConfig(source=str(tmp_path), seq_len=5, micro_batch_size=1)
    for r in range(2):
        loader = build_loader(cfg, TOK, rank=r, world_size=2)
        tokens = [t for _ in range(12) for t in loader.next_row()[1:]]
        assert _doc_indices(tokens)[:7] == [r, r + 2, r + 4, r + 6, r + 8, r, r + 2]  # then the next pass
        assert loader.state_dict()["interleaved"]
        # positions of older versions: split by files, or past the first pass without the pass length
        for change in ({"interleaved": False}, {"num_documents": None}):
            state = loader.state_dict() | change
            if change.get("num_documents", 0) is None:
                del state["num_documents"]
            with pytest.raises(ValueError, match="by files or shards|older a3lm after its first pass"):
                build_loader(cfg, TOK, rank=r, world_size=2).load_state_dict(state)


# -- bad inputs ------------------------------------------------------------------------------------------


def test_missing_files_and_unknown_datasets_are_clear_errors(tmp_path, jsonl, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_loader(DataConfig(source=str(tmp_path / "nope.jsonl")), TOK)
    with pytest.raises(FileNotFoundError, match="no file matches"):
        build_loader(DataConfig(source=str(tmp_path / "*.parquet")), TOK)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        build_loader(DataConfig(source=str(tmp_path / "empty")), TOK)
    # no network in tests: offline, the Hub lookup fails at once instead of retrying
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="unknown dataset 'no-such-org-a3lm/no-such-dataset'"):
        build_loader(DataConfig(source="no-such-org-a3lm/no-such-dataset"), TOK)
    with pytest.raises(KeyError, match="no text field 'content'"):
        build_loader(DataConfig(source=str(jsonl), text_field="content"), TOK).next_batch()
    with pytest.raises(ValueError, match="exceeds the model's maximum of 16 positions"):
        build_loader(DataConfig(seq_len=18), TOK, max_positions=16)
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        build_loader(DataConfig(seq_len=1), TOK)
    with pytest.raises(ValueError, match="lacks synthetic words"):
        build_loader(DataConfig(), word_tokenizer(["the", "cat"]))


def _indexed_docs(n: int) -> list[str]:
    """Document i: its index in two words, then i % 4 filler words (uneven lengths)."""
    w = HMM.words
    return [" ".join([w[i // len(w)], w[i % len(w)], *[w[0]] * (i % 4)]) for i in range(n)]


def _doc_index(tokens: list[int]) -> int:
    return (tokens[0] - 4) * len(HMM.words) + tokens[1] - 4


def _doc_indices(tokens: list[int]) -> list[int]:
    """The index of every whole document (closed by EOS) of a token stream that starts at a document."""
    docs, start = [], 0
    for i, t in enumerate(tokens):
        if t == EOS:
            docs.append(_doc_index(tokens[start:i]))
            start = i + 1
    return docs


def _global_indices(docs: list[int], first: int, n: int) -> list[int]:
    """A rank's documents (indices within a pass of n) as the increasing global indices they stand
    for, the first one >= first (a rank's consecutive documents are fewer than n apart)."""
    out, g = [], first
    for d in docs:
        g += (d - g) % n
        out.append(g)
        g += 1
    return out


@pytest.mark.parametrize("old_world,new_world", [(2, 1), (1, 2), (2, 3)])
def test_resharded_resume_neither_repeats_nor_skips(tmp_path, old_world, new_world):
    n = 40
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in _indexed_docs(n)))
    cfg = DataConfig(source=str(path), seq_len=7, micro_batch_size=1)
    streams = []  # (the lowest global index it may hold, a token stream of whole documents)
    old = [build_loader(cfg, TOK, rank=r, world_size=old_world) for r in range(old_world)]
    for r, loader in enumerate(old):
        rows = [loader.next_row()[1:] for _ in range(45 + 4 * r)]  # passes in, ranks at different positions
        streams.append((0, [t for row in rows for t in row] + loader.buffer))
    states = [loader.state_dict() for loader in old]
    assert min(s["epoch"] for s in states) >= 1
    assert len({s["epoch"] for s in states}) > 1 or old_world == 1  # ranks in different passes
    end = 7 * n  # every global index below it is read exactly once
    for r in range(new_world):
        loader = build_loader(cfg, TOK, rank=r, world_size=new_world)
        loader.load_resharded(states)
        carried, first, tokens = len(loader.buffer), loader.offset, []
        while loader.last < end:
            tokens += loader.next_row()[1:]
        streams.append((first, tokens[carried:]))
    seen = [
        g for first, tokens in streams for g in _global_indices(_doc_indices(tokens), first, n) if g < end
    ]
    assert sorted(seen) == list(range(end))

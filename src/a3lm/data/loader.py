"""Training data: document sources, tokenisation and packing into fixed-length rows.

Rows are packed, never padded: documents are tokenised without special tokens, each followed by
EOS, concatenated, and cut into rows of `seq_len` = [BOS] + the next seq_len - 1 tokens of the
stream (a document may continue on the next row, after that row's BOS). Every position of every
row is a real token, so attention_mask is all ones and no padding is ever trained on. An empty
document (a blank line of a .txt file, a record whose text is "") adds nothing, not even its EOS.

The synthetic corpus uses seq_len = L + 2 (the default): each row is then exactly one document,
[BOS w_1 .. w_L EOS], so a row's probabilities are those of the HMM.

Sources:
- "synthetic": the embedded HMM corpus (`a3lm.synthetic`), endless and seekable;
- local files: a .txt (one document per line) / .jsonl / .json / .parquet file, a glob, or a folder
  (searched recursively);
- a named corpus that a package installs (`a3lm.corpora`): "fortunes", "fortunes:heldout";
- any other string: a Hugging Face Hub dataset name, streamed (`datasets.load_dataset(..., streaming=True)`).

Finite sources are repeated pass after pass: document g of the endless sequence is the source's
document g % N (N documents a pass; epoch g // N). Ranks take interleaved documents of that one
sequence (rank r gets documents r, r + W, r + 2W, ...) and pack them on their own, so a rank's epoch
is that of the last document it read: ranks cross an epoch's end at different steps, which does not
matter to resuming or resharding. The data position is (documents consumed, leftover tokens) per
rank; it is saved in checkpoints and a resumed loader continues with exactly the rows the
interrupted one would have produced.

Resuming on a different number of processes (`PackedLoader.load_resharded`): the documents every
old rank consumed are known, so the new ranks interleave the documents after the longest common
prefix, leaving out those some old rank already took, and each old rank's leftover tokens go to a
new rank first: no document or token is repeated or skipped. The rows themselves differ (packing
happens per rank) unless every document fills whole rows, as the synthetic corpus does. A Hub
dataset whose shard count is a multiple of the world size is split by shards, not interleaved (each
rank streams only its shards; local files are always interleaved): its positions are then
rank-local and cannot be resharded (a clear error says so).

Mixtures (`source="a.jsonl:0.7,HuggingFaceFW/fineweb@sample-10BT:0.3"`): document j of the endless
sequence comes from the source that the j-th draw of `datasets.interleave_datasets` names (seeded
probabilities, over endless per-source label streams, so no source is ever exhausted and the stopping
strategy never acts); it is that source's next document, each source read pass after pass as above.
Ranks, positions and resharding work on this one sequence exactly as for a single source; the state
also holds the draw's position (the interleaved dataset's own `state_dict`) and the documents read
from every source, so a resume seeks without redrawing from the start. Mixtures are always split by
document, never by shards.

Instruction data (`format="chat"`): each record is one row, [BOS] + the chat-template rendering of its
prompt + of its answer (+ EOS), padded on the right, never packed with another (see `next_chat_batch`).
"""

from __future__ import annotations

import copy
import glob
import itertools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from a3lm.data import corpora, synthetic
from a3lm.tokenizer import row_start_id

SYNTHETIC = "synthetic"
FORMATS = ("text", "chat")
LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class DataConfig:
    """Where the text comes from and how rows are shaped.

    source: "synthetic", local file(s) / glob / folder, or a Hub dataset name. seq_len: tokens per
    row including the BOS. micro_batch_size: rows per rank per forward.
    """

    source: str = SYNTHETIC
    name: str | None = None  # Hub dataset config (e.g. "sample-10BT" for FineWeb)
    split: str = "train"
    text_field: str = "text"
    seq_len: int = 18
    micro_batch_size: int = 32
    synthetic_length: int = 16  # words per synthetic document (L); seq_len = L + 2 aligns rows
    synthetic_seed: int | None = None  # the corpus stream; None: the run's `seed` (0 outside a run)
    hmm_seed: int = 0  # the HMM's probabilities
    format: str = "text"  # text: packed documents | chat: instruction records, one a row, answers as targets
    mixture_seed: int | None = None  # the draw of a mixture's sources; None: the run's `seed`

    def validate(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len must be >= 2 (BOS and one target), got {self.seq_len}")
        if self.micro_batch_size < 1:
            raise ValueError(f"data.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.source == SYNTHETIC and self.synthetic_length < 1:
            raise ValueError(f"data.synthetic_length must be >= 1, got {self.synthetic_length}")
        if self.format not in FORMATS:
            raise ValueError(f"data.format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        parts = mixture_parts(self.source)
        if any(p.source == SYNTHETIC for p in parts) and (len(parts) > 1 or self.format != "text"):
            raise ValueError("the synthetic corpus is plain text alone: it cannot be mixed nor read as chat")


@dataclass(frozen=True)
class MixturePart:
    """One source of `data.source`: where it is (Hub name or local files), its Hub config, its share."""

    source: str
    name: str | None
    weight: float
    label: str  # as written in data.source: the key of its count in the metrics log


def _weight_of(entry: str) -> float | None:
    """The weight after the last ':' of "source:weight"; None when the tail is no number ("x:heldout")."""
    head, _, tail = entry.rpartition(":")
    try:
        return float(tail) if head else None
    except ValueError:
        return None


def mixture_parts(spec: str, name: str | None = None) -> list[MixturePart]:
    """The sources of `spec`: one source as today, or "a:0.7,b@config:0.3" (weights normalised to sum 1).

    `@config` names a Hub dataset's config (FineWeb's "sample-10BT"); a lone source takes `name`.
    """
    entries = [e.strip() for e in spec.split(",")]
    if len(entries) == 1 and _weight_of(entries[0]) is None:
        return [MixturePart(spec, name, 1.0, spec)]
    parts = []
    for entry in entries:
        weight = _weight_of(entry)
        if weight is None:
            raise ValueError(f"data source {entry!r} of the mixture {spec!r} has no weight: "
                             "write each as source:weight")
        if not 0 < weight < float("inf"):
            raise ValueError(f"data source {entry!r}: its weight must be a positive number")
        source, config = entry.rpartition(":")[0], None
        if "@" in source and not os.path.exists(source):
            source, config = source.rsplit("@", 1)
        parts.append(MixturePart(source, config, weight, entry.rpartition(":")[0]))
    if len({p.label for p in parts}) < len(parts):
        raise ValueError(f"data mixture {spec!r} names a source twice: give each once, with its total weight")
    total = sum(p.weight for p in parts)
    return [replace(p, weight=p.weight / total) for p in parts]


def check_source_files(cfg: DataConfig) -> None:
    """Raise now for a local source of `cfg.source` (one or a mixture's) that is missing or unusable."""
    for part in mixture_parts(cfg.source, cfg.name):
        if part.source != SYNTHETIC:
            resolve_local_files(part.source)


@dataclass
class ChatTokens:
    """One instruction example's ids without the row start: the prompt (context) and the answer (targets)."""

    prompt: list[int]
    answer: list[int]


def chat_messages(example: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The conversation of a record: its `messages` (the last one the assistant's answer), or a user turn
    `prompt` and an assistant turn `response` (or `completion`)."""
    messages = example.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= m.keys()
                                                     for m in messages):
            raise ValueError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': ...}} records")
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise ValueError(f"{where}: the last message must be the assistant's answer, after another")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    prompt, answer = example.get("prompt"), example.get("response", example.get("completion"))
    if isinstance(prompt, str) and isinstance(answer, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    raise ValueError(f"{where} has neither chat 'messages' nor 'prompt' and 'response' strings; "
                     f"its fields are {sorted(example)}")


def render_chat(tokenizer: Any, messages: list[dict[str, str]], where: str) -> ChatTokens:
    """Prompt and answer ids of a conversation rendered by the tokenizer's chat template.

    The prompt is every message but the last, with the template's generation prompt (the assistant
    header); the answer is the rest of the full rendering, then EOS unless the template put it there.
    A leading BOS text is dropped: the loader starts every row with the row start itself.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("data.format=chat renders records with the tokenizer's chat template, and this "
                         "tokenizer has none: use a tokenizer with one (model.tokenizer) or set "
                         "tokenizer.chat_template")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(f"{where}: the chat template does not render the conversation as its prompt "
                         "followed by the answer, so the answer's tokens cannot be told apart")
    answer = full[len(prompt):]
    if tokenizer.bos_token and prompt.startswith(tokenizer.bos_token):
        prompt = prompt[len(tokenizer.bos_token):]

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    answer_ids = encode(answer)
    if tokenizer.eos_token_id not in answer_ids:  # the model learns to stop
        answer_ids.append(tokenizer.eos_token_id)
    return ChatTokens(encode(prompt), answer_ids)


# -- document sources --------------------------------------------------------------------------------


def resolve_local_files(source: str) -> tuple[str, list[str]] | None:
    """(datasets builder, files) for a local file, glob, folder or named corpus; None when `source` names
    none of them (a Hub dataset).

    Raises FileNotFoundError for a path-like source that does not exist or holds no usable file.
    """
    exts = ", ".join(LOCAL_BUILDERS)
    named = corpora.corpus_file(source)
    if named is not None:
        return "json", [str(named)]
    if any(c in source for c in "*?["):
        files = sorted(f for f in glob.glob(source, recursive=True) if os.path.isfile(f))
        if not files:
            raise FileNotFoundError(f"no file matches the data pattern {source!r}")
    elif os.path.isdir(source):
        files = sorted(str(p) for p in Path(source).rglob("*") if p.is_file() and p.suffix in LOCAL_BUILDERS)
        if not files:
            raise FileNotFoundError(f"data folder {source!r} holds no {exts} file")
    elif os.path.isfile(source):
        files = [source]
    elif Path(source).suffix in LOCAL_BUILDERS or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise FileNotFoundError(f"data file or folder {source!r} does not exist")
    else:
        return None
    kinds = {LOCAL_BUILDERS.get(Path(f).suffix) for f in files}
    if None in kinds:
        bad = next(f for f in files if Path(f).suffix not in LOCAL_BUILDERS)
        raise ValueError(f"unsupported data file {bad!r}: use {exts}")
    if len(kinds) > 1:
        raise ValueError(f"data files of mixed kinds ({', '.join(sorted(kinds))}) under {source!r}: use one kind")
    return kinds.pop(), files


def local_file_problem(path: str | Path) -> str | None:
    """What makes a local data file unreadable ("is empty", "line 3 is not JSON: ..."), or None."""
    import json

    path = Path(path)
    if path.suffix not in (".jsonl", ".json", ".txt", ".text"):
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        return "is empty"
    if path.suffix in (".txt", ".text"):
        return None
    if path.suffix == ".json":
        try:
            json.loads(text)  # one JSON document (an array of records) is fine too
            return None
        except json.JSONDecodeError:
            pass
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {n} is not JSON ({e.msg}): {line[:60]!r}"
        if not isinstance(record, dict):
            return f"line {n} is not a JSON object: {line[:60]!r}"
    return None


class HFDocuments:
    """Token ids of the documents of a `datasets` source (local files or the Hub), streamed."""

    endless = False  # read(start) ends with the pass

    def __init__(self, cfg: DataConfig, tokenizer: Any, label: str | None = None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.names = [label or cfg.source]
        self._dataset = self._load()

    def source_of(self, example: Any) -> int:
        return 0

    def _load(self):
        import datasets

        local = resolve_local_files(self.cfg.source)
        self._files = local[1] if local is not None else []
        if local is not None:
            builder, files = local
            # its parse errors are logged, then raised: we raise our own, naming the file and line
            logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
            try:
                return datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
            except Exception as e:  # an empty file: StopIteration from the builder's schema peek
                raise self._read_error(e) from e
        try:
            return datasets.load_dataset(self.cfg.source, self.cfg.name, split=self.cfg.split, streaming=True)
        except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
            raise ValueError(
                f"unknown dataset {self.cfg.source!r}: it is neither a local file/folder nor loadable from the "
                f"Hugging Face Hub ({type(e).__name__}: {e}). Give a Hub dataset name, local "
                f"{', '.join(LOCAL_BUILDERS)} files or a folder, or 'synthetic'"
            ) from e

    def interleaved(self, world_size: int) -> bool:
        """Whether ranks take interleaved documents (r, r + W, ...), not each its own shards.

        Local files always are (reading them whole on every rank is cheap); a Hub dataset whose shard
        count is a multiple of the world size is split by shards, so that each rank streams only its own.
        """
        return bool(self._files) or world_size == 1 or self._dataset.num_shards % world_size != 0

    def read(self, start: int, node: tuple[int, int] | None = None) -> Iterator[Any]:
        """One pass over the examples from the `start`-th on; node=(rank, world size): that rank's shards only."""
        from datasets.distributed import split_dataset_by_node

        ds = self._dataset if node is None else split_dataset_by_node(self._dataset, rank=node[0], world_size=node[1])
        # skip before tokenising: resuming costs reading the skipped documents, not encoding them
        examples = iter(ds.skip(start) if start else ds)
        while True:
            try:
                yield next(examples)
            except StopIteration:
                return
            except Exception as e:  # datasets' parse errors name neither the file nor the line
                raise self._read_error(e) from e

    def tokens(self, example: dict[str, Any], index: int) -> list[int] | ChatTokens:
        """Token ids (no special tokens) of `example`, the source's `index`-th document (0-based); with
        data.format=chat, its prompt and answer ids."""
        if self.cfg.format == "chat":
            where = f"data {self.cfg.source!r}: record {index} (0-based)"
            return render_chat(self.tokenizer, chat_messages(example, where), where)
        field = self.cfg.text_field
        if field not in example:
            raise KeyError(f"data {self.cfg.source!r} has no text field {field!r}; its columns are "
                           f"{sorted(example)} (set data.text_field)")
        text = example[field]
        if not isinstance(text, str):
            raise ValueError(f"data {self.cfg.source!r}: document {index} (0-based) has no text: its field "
                             f"{field!r} is {text!r}, not a string")
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _read_error(self, err: Exception) -> Exception:
        """A one-line error naming the local file and what is wrong with it (empty, line N not JSON)."""
        for f in self._files:
            problem = local_file_problem(f)
            if problem:
                return ValueError(f"data file {f}{' ' if problem.startswith('is ') else ': '}{problem}")
        return ValueError(f"cannot read data {self.cfg.source!r}: {type(err).__name__}: {err}")


class SyntheticDocuments:
    """Token ids of the HMM corpus; document i depends only on (seed, i): seeking is free.

    With `word_tokenizer(hmm.words)` (the embedded default) token id = word index + 4 (after <pad>
    <bos> <eos> <unk>); any tokenizer holding every word works through its own ids.
    """

    endless = True
    names = [SYNTHETIC]

    def __init__(self, cfg: DataConfig, tokenizer: Any, hmm: synthetic.HMM | None = None):
        self.hmm = hmm or synthetic.default_hmm(cfg.hmm_seed)
        seed = 0 if cfg.synthetic_seed is None else cfg.synthetic_seed
        self.corpus = synthetic.SyntheticCorpus(self.hmm, cfg.synthetic_length, seed)
        ids = tokenizer.convert_tokens_to_ids(self.hmm.words)
        if tokenizer.unk_token_id in ids:
            missing = [w for w, i in zip(self.hmm.words, ids, strict=True) if i == tokenizer.unk_token_id]
            raise ValueError(f"the tokenizer lacks synthetic words {missing}; use a3lm.tokenizer.word_tokenizer(hmm.words)")
        self.word_to_token = torch.tensor(ids)

    def interleaved(self, world_size: int) -> bool:
        return True

    def read(self, start: int, node: tuple[int, int] | None = None) -> Iterator[int]:
        """The corpus's document indices from `start` on, endless (`node` is never set: always interleaved)."""
        return itertools.count(start)

    def tokens(self, example: int, index: int) -> list[int]:
        return self.word_to_token[self.corpus[example]].tolist()

    def source_of(self, example: Any) -> int:
        return 0


def read_passes(docs: Any, first: int, num_documents: int | None, on_pass_end: Callable[[int], None],
                node: tuple[int, int] | None = None, who: str = "") -> Iterator[tuple[int, Any]]:
    """(global index, example) of `docs` from global index `first` on; a finite source is read pass
    after pass, `on_pass_end(n)` told its pass length n at the end of every pass."""
    # base: the global index of the pass's first document. A finite source's first pass is read from
    # its start when its length is not known yet, since its end tells the pass length
    if num_documents:
        base, start = first - first % num_documents, first % num_documents
    else:
        base, start = 0, first if docs.endless else 0
    while True:
        end = start
        for end, example in enumerate(docs.read(start, node), start + 1):
            if base + end > first:
                yield base + end - 1, example
        if end == start:
            raise ValueError(f"data source {docs.names[0]!r} yields no documents{who}")
        on_pass_end(end)
        base, start = base + end, 0


def _source_labels(source: int) -> Iterator[dict[str, int]]:
    """An endless stream naming one source: what `interleave_datasets` draws from."""
    while True:
        yield {"source": source}


@dataclass
class MixtureExample:
    source: int  # which source of the mixture
    index: int  # the source's global document index (pass after pass)
    example: Any


class MixtureDocuments:
    """The documents of several sources in one endless sequence: document j is the next one of the source
    that the j-th draw of `datasets.interleave_datasets` names (seeded probabilities).

    position() is where reading stands: the draw's state (the interleaved dataset's `state_dict`), the
    documents taken from each source, and the sequence index; `anchor` is the position reading starts
    from (a resumed one), so that seeking redraws only from there on.
    """

    endless = True

    def __init__(self, cfg: DataConfig, tokenizer: Any, parts: list[MixturePart]):
        self.cfg, self.parts = cfg, parts
        self.names = [p.label for p in parts]
        self.sources = [HFDocuments(replace(cfg, source=p.source, name=p.name), tokenizer, p.label)
                        for p in parts]
        self.num_documents: list[int | None] = [None] * len(parts)  # pass lengths, once known
        self.anchor = self.start()
        self._live: dict[str, Any] | None = None  # the draw dataset and position being read

    def start(self) -> dict[str, Any]:
        return {"index": 0, "draws": None, "counts": [0] * len(self.parts)}

    def _draws(self) -> Any:
        import datasets

        streams = [datasets.IterableDataset.from_generator(_source_labels, gen_kwargs={"source": i})
                   for i in range(len(self.parts))]
        seed = 0 if self.cfg.mixture_seed is None else self.cfg.mixture_seed
        # endless streams: no source is ever exhausted, so the stopping strategy never acts
        return datasets.interleave_datasets(streams, probabilities=[p.weight for p in self.parts], seed=seed,
                                            stopping_strategy="first_exhausted")

    def position(self) -> dict[str, Any]:
        live = self._live
        if live is None:
            return copy.deepcopy(self.anchor)
        return {"index": live["index"], "draws": copy.deepcopy(live["dataset"].state_dict()),
                "counts": list(live["counts"])}

    def interleaved(self, world_size: int) -> bool:
        return True

    def read(self, start: int, node: tuple[int, int] | None = None) -> Iterator[MixtureExample]:
        """The sequence's documents from index `start` on, endless."""
        anchor = self.anchor if self.anchor["index"] <= start else self.start()
        dataset = self._draws()
        if anchor["draws"] is not None:
            dataset.load_state_dict(copy.deepcopy(anchor["draws"]))
        counts = list(anchor["counts"])
        draws = (row["source"] for row in dataset)
        for s in itertools.islice(draws, start - anchor["index"]):
            counts[s] += 1
        readers = [self._source_examples(i, counts[i]) for i in range(len(self.parts))]
        live = self._live = {"dataset": dataset, "index": start, "counts": counts}
        for s in draws:
            index, example = next(readers[s])
            counts[s] += 1
            live["index"] += 1  # before the yield: position() is then the one after this document
            yield MixtureExample(s, index, example)

    def _source_examples(self, i: int, first: int) -> Iterator[tuple[int, Any]]:
        def record(n: int) -> None:
            self.num_documents[i] = n

        return read_passes(self.sources[i], first, self.num_documents[i], record)

    def tokens(self, example: MixtureExample, index: int) -> list[int] | ChatTokens:
        n = self.num_documents[example.source]
        return self.sources[example.source].tokens(example.example, example.index % n if n else example.index)

    def source_of(self, example: MixtureExample) -> int:
        return example.source


def _one_run(buffer: list[int]) -> list[list[int]]:
    """The source runs of a buffer saved before sources were counted: all of it the one source's."""
    return [[0, len(buffer)]] if buffer else []


def _nth_kept(offset: int, skip: list[int], j: int) -> int:
    """The global index of the j-th document from `offset` on that is not in the sorted `skip`."""
    i = offset + j
    for s in skip:
        if s > i:
            break
        i += 1
    return i


Documents = HFDocuments | SyntheticDocuments | MixtureDocuments


def documents(cfg: DataConfig, tokenizer: Any) -> Documents:
    if cfg.source == SYNTHETIC:
        return SyntheticDocuments(cfg, tokenizer)
    parts = mixture_parts(cfg.source, cfg.name)
    if len(parts) > 1:
        return MixtureDocuments(cfg, tokenizer, parts)
    return HFDocuments(replace(cfg, source=parts[0].source, name=parts[0].name), tokenizer, parts[0].label)


# -- packing -------------------------------------------------------------------------------------------


def special_ids(tokenizer: Any) -> tuple[int, int]:
    """(row-start id, document-end id); the row start is `tokenizer.row_start_id`'s, as everywhere."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token: packing needs one between documents")
    return row_start_id(tokenizer), eos


class PackedLoader:
    """Batches of packed rows for one rank: {"input_ids", "attention_mask"} [micro_batch_size, seq_len]
    (data.format=chat: one example per row, see `next_chat_batch`).

    state_dict() is the position after the last batch returned; load_state_dict() seeks there.
    """

    def __init__(self, docs: Documents, cfg: DataConfig, bos_id: int, eos_id: int, rank: int = 0,
                 world_size: int = 1):
        self.docs, self.cfg, self.bos_id, self.eos_id = docs, cfg, bos_id, eos_id
        self.rank, self.world_size = rank, world_size
        self.consumed, self.buffer = 0, []
        # tokens this rank put into rows, per source (BOS and padding are no source's), and the sources
        # of the buffer's tokens as [source, count] runs
        self.source_tokens, self.buffer_sources = [0] * len(docs.names), []
        self._skipped = 0  # chat examples whose prompt fills a row
        # the ranks take turns over the global indices from `offset` on, less those in `skip` (both
        # non-trivial only after a resharded resume); False: each rank indexes its own shards
        self.offset, self.skip = 0, []
        self.interleaved = docs.interleaved(world_size)
        self.num_documents: int | None = None  # documents in one pass, known once a pass has ended
        self.epoch, self.last = 0, -1  # the pass and the global index of the last document read
        self._empty_run = 0  # empty documents read in a row
        self._it: Iterator[list[int]] | None = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "last": self.last, "documents": self.consumed, "buffer": list(self.buffer),
                "rank": self.rank, "world_size": self.world_size, "offset": self.offset, "skip": list(self.skip),
                "interleaved": self.interleaved, "num_documents": self.num_documents,
                "source_tokens": list(self.source_tokens),
                "buffer_sources": [list(r) for r in self.buffer_sources],
                **self._mixture_state()}

    def _mixture_state(self) -> dict:
        if not isinstance(self.docs, MixtureDocuments):
            return {}
        return {"mixture": self.docs.position(), "source_num_documents": list(self.docs.num_documents)}

    def _load_mixture_state(self, states: list[dict]) -> None:
        """The draw position to read on from: the earliest of `states` (every rank reads at or after it)."""
        if isinstance(self.docs, MixtureDocuments) != ("mixture" in states[0]):
            raise ValueError(f"the checkpoint's data position is not one of the data {self.cfg.source!r}: "
                             "resume with the data source the run started with")
        if isinstance(self.docs, MixtureDocuments):
            self.docs.anchor = copy.deepcopy(min((s["mixture"] for s in states), key=lambda m: m["index"]))
            lengths = zip(*(s["source_num_documents"] for s in states), strict=True)
            self.docs.num_documents = [next((n for n in ns if n), None) for ns in lengths]
            self.docs._live = None

    def load_state_dict(self, state: dict) -> None:
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(
                f"data position saved by rank {state['rank']} of {state['world_size']} cannot resume rank "
                f"{self.rank} of {self.world_size} with load_state_dict: use load_resharded"
            )
        self._check_position_format(state)
        if not state.get("interleaved", True) and self.interleaved:
            raise ValueError(f"the checkpoint splits data {self.cfg.source!r} over {self.world_size} processes by "
                             "files or shards (as a3lm did for local folders before); this version splits it by "
                             "document, so the position cannot continue: start a new --output")
        self.consumed, self.buffer = state["documents"], list(state["buffer"])
        self.offset, self.skip = state.get("offset", 0), list(state.get("skip", []))
        self.interleaved, self.num_documents = state.get("interleaved", True), state.get("num_documents")
        self.epoch, self.last, self._empty_run, self._it = state["epoch"], state.get("last", -1), 0, None
        self.source_tokens = list(state.get("source_tokens", [0] * len(self.docs.names)))
        # positions saved before sources were counted: the buffer's tokens are the one source's
        self.buffer_sources = [list(r) for r in state.get("buffer_sources", _one_run(state["buffer"]))]
        self._load_mixture_state([state])

    def load_resharded(self, states: list[dict]) -> None:
        """Continue from the positions of every rank of a run with len(states) processes.

        Old rank r took the positions r, r + W, ... of the document sequence; the first
        W * min(consumed) positions were all taken: the new sequence starts there, leaving out the
        later positions some rank took. Old rank r's leftover tokens go to new rank r % new_world.
        """
        old_world = len(states)
        if not all(s.get("interleaved", True) for s in states):
            raise ValueError(f"data source {self.cfg.source!r} was split by shards over {old_world} processes, so "
                             f"its position cannot be resharded: resume with {old_world} processes")
        for s in states:
            self._check_position_format(s)
        offset, skip = states[0].get("offset", 0), sorted(states[0].get("skip", []))
        counts = [s["documents"] for s in states]
        prefix = old_world * min(counts)
        taken = [r + k * old_world for r, c in enumerate(counts) for k in range(min(counts), c)]
        self.offset = _nth_kept(offset, skip, prefix)
        self.skip = sorted({*(s for s in skip if s >= self.offset), *(_nth_kept(offset, skip, j) for j in taken)})
        self.num_documents = next((s["num_documents"] for s in states if s.get("num_documents")), None)
        self.interleaved, self.consumed, self._empty_run, self._it = True, 0, 0, None
        self.last = self.offset - 1
        self.epoch = max(self.last, 0) // self.num_documents if self.num_documents else 0
        mine = [s for r, s in enumerate(states) if r % self.world_size == self.rank]
        self.buffer = [t for s in mine for t in s["buffer"]]
        self.buffer_sources = [list(run) for s in mine for run in s.get("buffer_sources", _one_run(s["buffer"]))]
        # the old counts are summed by the new ranks that took their buffers: the global sums stay
        zero = [0] * len(self.docs.names)
        self.source_tokens = [sum(c) for c in zip(zero, *(s.get("source_tokens", zero) for s in mine), strict=True)]
        self._load_mixture_state(states)

    def _check_position_format(self, state: dict) -> None:
        """Positions saved before documents were numbered across passes hold only within the first pass."""
        if "num_documents" not in state and state["epoch"] > 0:
            raise ValueError(f"the checkpoint's position in data {self.cfg.source!r} was saved by an older a3lm "
                             "after its first pass over the data, which this version cannot continue exactly: "
                             "start a new --output")

    def check_readable(self) -> None:
        """Build one row now, then rewind: an empty or unreadable source fails before training."""
        state = self.state_dict()
        self.next_chat_row() if self.cfg.format == "chat" else self.next_row()
        self.load_state_dict(state)

    def _documents(self) -> Iterator[tuple[int, list[int] | ChatTokens]]:
        """(source, token ids) of this rank's documents from its `consumed`-th on, pass after pass."""
        rank, world = (self.rank, self.world_size) if self.interleaved else (0, 1)
        skip = set(self.skip)
        first = _nth_kept(self.offset, self.skip, rank + self.consumed * world)
        kept = ((g, example) for g, example in self._passes(first) if g not in skip)
        for g, example in itertools.islice(kept, 0, None, world):
            n = self.num_documents
            self.last, self.epoch = g, g // n if n else 0
            yield self.docs.source_of(example), self.docs.tokens(example, g % n if n else g)

    def _passes(self, first: int) -> Iterator[tuple[int, Any]]:
        """(global index, example) from global index `first` on; a finite source is read pass after pass."""
        node = None if self.interleaved else (self.rank, self.world_size)

        def record(n: int) -> None:
            self.num_documents = n

        return read_passes(self.docs, first, self.num_documents, record, node, f" for rank {self.rank}")

    def _next_document(self) -> tuple[int, list[int] | ChatTokens]:
        if self._it is None:
            self._it = self._documents()
        source, doc = next(self._it)
        self.consumed += 1
        return source, doc

    def _check_not_all_empty(self, usable: bool, what: str = "is empty: no text to train on") -> None:
        """Fail instead of looping forever when every document this rank will ever read is unusable."""
        # past the skipped indices, this rank's documents recur with a period of at most one pass:
        # one pass worth of unusable ones in a row means no usable one will ever come
        if usable or self.last <= max(self.skip, default=-1):
            self._empty_run = 0
            return
        self._empty_run += 1
        if self.num_documents is not None and self._empty_run >= self.num_documents:
            whose = "" if self.world_size == 1 else f" that rank {self.rank} of {self.world_size} reads"
            raise ValueError(f"every document of data source {self.cfg.source!r}{whose} {what}")

    def next_row(self) -> list[int]:
        need = self.cfg.seq_len - 1
        while len(self.buffer) < need:
            source, doc = self._next_document()
            self._check_not_all_empty(bool(doc))
            if doc:  # an empty document adds nothing, not even its EOS
                self.buffer += [*doc, self.eos_id]
                self.buffer_sources.append([source, len(doc) + 1])
        row, self.buffer = [self.bos_id, *self.buffer[:need]], self.buffer[need:]
        self._count_taken(need)
        return row

    def _count_taken(self, n: int) -> None:
        """Credit the first `n` tokens of the buffer's source runs to their sources."""
        while n:
            run = self.buffer_sources[0]
            take = min(n, run[1])
            self.source_tokens[run[0]] += take
            run[1] -= take
            n -= take
            if run[1] == 0:
                self.buffer_sources.pop(0)

    def next_chat_row(self) -> tuple[list[int], int]:
        """One instruction example: [BOS] + prompt + answer, cut at seq_len, and its known length (BOS and
        prompt). An example whose prompt leaves no room for an answer token is skipped (logged)."""
        while True:
            source, example = self._next_document()
            known = 1 + len(example.prompt)
            self._check_not_all_empty(known < self.cfg.seq_len, f"has a prompt of data.seq_len="
                                      f"{self.cfg.seq_len} tokens or more: no answer fits")
            if known < self.cfg.seq_len:
                row = [self.bos_id, *example.prompt, *example.answer][: self.cfg.seq_len]
                self.source_tokens[source] += len(row) - 1
                return row, known
            self._skipped += 1
            if self._skipped == 1:
                logging.getLogger(__name__).warning(
                    "data %r: skipping instruction examples whose prompt fills data.seq_len=%d (rank %d's "
                    "document %d is the first)", self.cfg.source, self.cfg.seq_len, self.rank, self.last)

    def next_chat_batch(self) -> dict[str, torch.Tensor]:
        """Rows of one example each, right-padded to the longest: input_ids, attention_mask, labels (-100
        on BOS, prompt and padding) and known_mask (BOS and prompt: the context of every grouping) [B, N].

        Never packed: the two-stream attention lets a token see every earlier group of its row, so an
        example sharing a row would see another's tokens.
        """
        rows = [self.next_chat_row() for _ in range(self.cfg.micro_batch_size)]
        B, N = len(rows), max(len(row) for row, _ in rows)
        ids = torch.full((B, N), self.eos_id, dtype=torch.long)
        mask, known_mask = torch.zeros_like(ids), torch.zeros((B, N), dtype=torch.bool)
        labels = torch.full_like(ids, -100)
        for b, (row, known) in enumerate(rows):
            ids[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = 1
            known_mask[b, :known] = True
            labels[b, known : len(row)] = ids[b, known : len(row)]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "known_mask": known_mask}

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.cfg.format == "chat":
            return self.next_chat_batch()
        ids = torch.tensor([self.next_row() for _ in range(self.cfg.micro_batch_size)], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()


def build_loader(cfg: DataConfig, tokenizer: Any, rank: int = 0, world_size: int = 1,
                 max_positions: int | None = None) -> PackedLoader:
    """The packed loader for `cfg`, checking seq_len against the model's maximum position."""
    cfg.validate()
    if max_positions is not None and cfg.seq_len > max_positions:
        raise ValueError(
            f"data.seq_len {cfg.seq_len} exceeds the model's maximum of {max_positions} positions "
            "(max_position_embeddings); use a shorter data.seq_len"
        )
    bos, eos = special_ids(tokenizer)
    return PackedLoader(documents(cfg, tokenizer), cfg, bos, eos, rank, world_size)

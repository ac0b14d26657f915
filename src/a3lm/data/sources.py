"""Document sources: local files, Hub datasets and the synthetic corpus, read pass after pass."""

from __future__ import annotations

import glob
import itertools
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from a3lm.data import corpora, synthetic
from a3lm.data.config import LOCAL_BUILDERS, SYNTHETIC, DataConfig, mixture_parts
from a3lm.data.instructions import ChatTokens, chat_messages, render_chat


def check_source_files(cfg: DataConfig) -> None:
    """Raise now for a local source of `cfg.source` (one or a mixture's) that is missing or unusable."""
    for part in mixture_parts(cfg.source, cfg.name):
        if part.source != SYNTHETIC:
            resolve_local_files(part.source)


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
        raise ValueError(
            f"data files of mixed kinds ({', '.join(sorted(kinds))}) under {source!r}: use one kind"
        )
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
        except (
            Exception
        ) as e:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
            raise ValueError(
                f"unknown dataset {self.cfg.source!r}: "
                "it is neither a local file/folder nor loadable from the "
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
        """One pass over the examples from the `start`-th on; node=(rank, world size): that rank's
        shards only."""
        from datasets.distributed import split_dataset_by_node

        ds = (
            self._dataset
            if node is None
            else split_dataset_by_node(self._dataset, rank=node[0], world_size=node[1])
        )
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
            raise KeyError(
                f"data {self.cfg.source!r} has no text field {field!r}; its columns are "
                f"{sorted(example)} (set data.text_field)"
            )
        text = example[field]
        if not isinstance(text, str):
            raise ValueError(
                f"data {self.cfg.source!r}: document {index} (0-based) has no text: its field "
                f"{field!r} is {text!r}, not a string"
            )
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
            raise ValueError(
                f"the tokenizer lacks synthetic words {missing}; use a3lm.tokenizer.word_tokenizer(hmm.words)"
            )
        self.word_to_token = torch.tensor(ids)

    def interleaved(self, world_size: int) -> bool:
        return True

    def read(self, start: int, node: tuple[int, int] | None = None) -> Iterator[int]:
        """The corpus's document indices from `start` on, endless (`node` is never set: always
        interleaved)."""
        return itertools.count(start)

    def tokens(self, example: int, index: int) -> list[int]:
        return self.word_to_token[self.corpus[example]].tolist()

    def source_of(self, example: Any) -> int:
        return 0


def read_passes(
    docs: Any,
    first: int,
    num_documents: int | None,
    on_pass_end: Callable[[int], None],
    node: tuple[int, int] | None = None,
    who: str = "",
) -> Iterator[tuple[int, Any]]:
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

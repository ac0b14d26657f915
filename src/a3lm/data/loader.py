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
import itertools
import logging
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch

from a3lm.data.config import SYNTHETIC, DataConfig, mixture_parts
from a3lm.data.instructions import ChatTokens
from a3lm.data.mixture import MixtureDocuments
from a3lm.data.sources import HFDocuments, SyntheticDocuments, read_passes
from a3lm.tokenizer import row_start_id


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


def resharded_sequence(states: list[dict]) -> tuple[int, list[int]]:
    """(offset, skip) of the document sequence that continues the positions of every old rank: the first
    W * min(consumed) positions were all taken; the later ones some rank took are skipped."""
    old_world = len(states)
    offset, skip = states[0].get("offset", 0), sorted(states[0].get("skip", []))
    counts = [s["documents"] for s in states]
    taken = [r + k * old_world for r, c in enumerate(counts) for k in range(min(counts), c)]
    new_offset = _nth_kept(offset, skip, old_world * min(counts))
    return new_offset, sorted(
        {*(s for s in skip if s >= new_offset), *(_nth_kept(offset, skip, j) for j in taken)}
    )


class PackedLoader:
    """Batches of packed rows for one rank: {"input_ids", "attention_mask"} [micro_batch_size, seq_len]
    (data.format=chat: one example per row, see `next_chat_batch`).

    state_dict() is the position after the last batch returned; load_state_dict() seeks there.
    """

    def __init__(
        self, docs: Documents, cfg: DataConfig, bos_id: int, eos_id: int, rank: int = 0, world_size: int = 1
    ):
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
        return {
            "epoch": self.epoch,
            "last": self.last,
            "documents": self.consumed,
            "buffer": list(self.buffer),
            "rank": self.rank,
            "world_size": self.world_size,
            "offset": self.offset,
            "skip": list(self.skip),
            "interleaved": self.interleaved,
            "num_documents": self.num_documents,
            "source_tokens": list(self.source_tokens),
            "buffer_sources": [list(r) for r in self.buffer_sources],
            **self._mixture_state(),
        }

    def _mixture_state(self) -> dict:
        if not isinstance(self.docs, MixtureDocuments):
            return {}
        return {"mixture": self.docs.position(), "source_num_documents": list(self.docs.num_documents)}

    def _load_mixture_state(self, states: list[dict]) -> None:
        """The draw position to read on from: the earliest of `states` (every rank reads at or after it)."""
        if isinstance(self.docs, MixtureDocuments) != ("mixture" in states[0]):
            raise ValueError(
                f"the checkpoint's data position is not one of the data {self.cfg.source!r}: "
                "resume with the data source the run started with"
            )
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
            raise ValueError(
                f"the checkpoint splits data {self.cfg.source!r} over {self.world_size} processes by "
                "files or shards (as a3lm did for local folders before); this version splits it by "
                "document, so the position cannot continue: start a new --output"
            )
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
            raise ValueError(
                f"data source {self.cfg.source!r} was split by shards over {old_world} processes, so "
                f"its position cannot be resharded: resume with {old_world} processes"
            )
        for s in states:
            self._check_position_format(s)
        self.offset, self.skip = resharded_sequence(states)
        self.num_documents = next((s["num_documents"] for s in states if s.get("num_documents")), None)
        self.interleaved, self.consumed, self._empty_run, self._it = True, 0, 0, None
        self.last = self.offset - 1
        self.epoch = max(self.last, 0) // self.num_documents if self.num_documents else 0
        mine = [s for r, s in enumerate(states) if r % self.world_size == self.rank]
        self.buffer = [t for s in mine for t in s["buffer"]]
        self.buffer_sources = [
            list(run) for s in mine for run in s.get("buffer_sources", _one_run(s["buffer"]))
        ]
        # the old counts are summed by the new ranks that took their buffers: the global sums stay
        zero = [0] * len(self.docs.names)
        self.source_tokens = [
            sum(c) for c in zip(zero, *(s.get("source_tokens", zero) for s in mine), strict=True)
        ]
        self._load_mixture_state(states)

    def _check_position_format(self, state: dict) -> None:
        """Positions saved before documents were numbered across passes hold only within the first pass."""
        if "num_documents" not in state and state["epoch"] > 0:
            raise ValueError(
                f"the checkpoint's position in data {self.cfg.source!r} was saved by an older a3lm "
                "after its first pass over the data, which this version cannot continue exactly: "
                "start a new --output"
            )

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
            self._check_not_all_empty(
                known < self.cfg.seq_len,
                f"has a prompt of data.seq_len={self.cfg.seq_len} tokens or more: no answer fits",
            )
            if known < self.cfg.seq_len:
                row = [self.bos_id, *example.prompt, *example.answer][: self.cfg.seq_len]
                self.source_tokens[source] += len(row) - 1
                return row, known
            self._skipped += 1
            if self._skipped == 1:
                logging.getLogger(__name__).warning(
                    "data %r: skipping instruction examples whose prompt fills data.seq_len=%d (rank %d's "
                    "document %d is the first)",
                    self.cfg.source,
                    self.cfg.seq_len,
                    self.rank,
                    self.last,
                )

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


def build_loader(
    cfg: DataConfig, tokenizer: Any, rank: int = 0, world_size: int = 1, max_positions: int | None = None
) -> PackedLoader:
    """The packed loader for `cfg`, checking seq_len against the model's maximum position."""
    cfg.validate()
    if max_positions is not None and cfg.seq_len > max_positions:
        raise ValueError(
            f"data.seq_len {cfg.seq_len} exceeds the model's maximum of {max_positions} positions "
            "(max_position_embeddings); use a shorter data.seq_len"
        )
    bos, eos = special_ids(tokenizer)
    return PackedLoader(documents(cfg, tokenizer), cfg, bos, eos, rank, world_size)

"""Mixtures: documents drawn from several sources by `datasets.interleave_datasets`, resumable exactly."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from a3lm.data.config import DataConfig, MixturePart
from a3lm.data.instructions import ChatTokens
from a3lm.data.sources import HFDocuments, read_passes


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
        self.sources = [
            HFDocuments(replace(cfg, source=p.source, name=p.name), tokenizer, p.label) for p in parts
        ]
        self.num_documents: list[int | None] = [None] * len(parts)  # pass lengths, once known
        self.anchor = self.start()
        self._live: dict[str, Any] | None = None  # the draw dataset and position being read

    def start(self) -> dict[str, Any]:
        return {"index": 0, "draws": None, "counts": [0] * len(self.parts)}

    def _draws(self) -> Any:
        import datasets

        streams = [
            datasets.IterableDataset.from_generator(_source_labels, gen_kwargs={"source": i})
            for i in range(len(self.parts))
        ]
        seed = 0 if self.cfg.mixture_seed is None else self.cfg.mixture_seed
        # endless streams: no source is ever exhausted, so the stopping strategy never acts
        return datasets.interleave_datasets(
            streams,
            probabilities=[p.weight for p in self.parts],
            seed=seed,
            stopping_strategy="first_exhausted",
        )

    def position(self) -> dict[str, Any]:
        live = self._live
        if live is None:
            return copy.deepcopy(self.anchor)
        return {
            "index": live["index"],
            "draws": copy.deepcopy(live["dataset"].state_dict()),
            "counts": list(live["counts"]),
        }

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

"""What a run reads: `DataConfig`, and a mixture's sources parsed from `data.source`."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

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
            raise ValueError(
                f"data source {entry!r} of the mixture {spec!r} has no weight: write each as source:weight"
            )
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

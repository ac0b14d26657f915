"""ROCStories middle-sentence infilling, scored by ROUGE-1/2/L (the DiffuLLaMA protocol).

Each story has five sentences; sentences 1-2 and 4-5 are given, sentence 3 is a blank of the
reference's token length (or a fixed length) filled by the A3 sampler: every known token first
(left-to-right singletons), then the blank by a `DecodingConfig` (group-wise in an order, dynamic
resampling, or speculative). Two CSV layouts are read:

- ROCStories: storyid, storytitle, sentence1..sentence5;
- Story Cloze (cloze_test_val__spring2016.csv, what DiffuLLaMA evaluated): InputStoryid,
  InputSentence1..4, RandomFifthSentenceQuiz1, RandomFifthSentenceQuiz2, AnswerRightEnding; the
  right ending (quiz 1 or 2 by AnswerRightEnding) is sentence 5.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rouge_score import rouge_scorer
from tqdm.auto import tqdm

from a3lm.decoding.api import infill
from a3lm.decoding.config import DecodingConfig
from a3lm.evaluation.continuations import generation_generator, prefix_token_id
from a3lm.evaluation.lm_eval_adapter import ar_generate
from a3lm.model.modeling import A3ForCausalLM

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
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = set(reader.fieldnames or [])
            story = _row_reader(path, header)
            stories = [story(r, reader.line_num) for r in reader]
    except UnicodeDecodeError as e:
        problem = f"{e.reason} at byte {e.start}"
        raise ValueError(f"{path} is not UTF-8 text ({problem}): not a CSV of stories") from e
    if not stories:
        raise ValueError(f"{path} holds no stories (a header and no rows)")
    return stories


_ROC = tuple(f"sentence{i}" for i in range(1, 6))
_CLOZE = (
    *(f"InputSentence{i}" for i in range(1, 5)),
    "RandomFifthSentenceQuiz1",
    "RandomFifthSentenceQuiz2",
    "AnswerRightEnding",
)


def _row_reader(path: Path, header: set[str]) -> Any:
    """A function (csv row, its line number) -> Story for the file's layout; a bad row is an error
    naming the file, the line and the column."""
    if not header:
        raise ValueError(f"{path} is empty: expected a CSV header")
    layout = _ROC if set(_ROC) <= header else _CLOZE if set(_CLOZE) <= header else None
    if layout is None:
        raise ValueError(
            f"{path}: unknown CSV layout (header {sorted(header)}); expected ROCStories columns "
            "sentence1..sentence5 or Story Cloze columns InputSentence1..4, RandomFifthSentenceQuiz1/2, "
            "AnswerRightEnding"
        )

    def story(r: dict[str, str | None], line: int) -> Story:
        missing = [k for k in layout if r.get(k) is None]
        if missing:
            raise ValueError(
                f"{path} line {line}: no {missing[0]} (the row has fewer columns than the header)"
            )
        if layout is _ROC:
            sentences = tuple(r[k].strip() for k in _ROC)  # type: ignore[union-attr]
            return Story(r.get("storyid") or "", sentences)  # type: ignore[arg-type]
        answer = (r["AnswerRightEnding"] or "").strip()
        if answer not in ("1", "2"):
            raise ValueError(f"{path} line {line}: AnswerRightEnding must be 1 or 2, got {answer!r}")
        given = tuple(r[f"InputSentence{i}"].strip() for i in range(1, 5))  # type: ignore[union-attr]
        right = r[f"RandomFifthSentenceQuiz{answer}"].strip()  # type: ignore[union-attr]
        return Story(r.get("InputStoryid") or "", (*given, right))

    return story


def find_stories_file(data_dir: str | Path) -> Path:
    """DATA_DIR/rocstories/cloze_test_val__spring2016.csv, else the only other CSV there; a clear
    error if none."""
    folder = Path(data_dir) / "rocstories"
    if (folder / CLOZE_FILE).is_file():
        return folder / CLOZE_FILE
    csvs = sorted(folder.glob("*.csv")) if folder.is_dir() else []
    if len(csvs) == 1:
        return csvs[0]
    from a3lm.evaluation.tasks import MissingDataError

    if len(csvs) > 1:
        raise MissingDataError(
            f"several CSVs in {folder} ({', '.join(c.name for c in csvs)}): keep one, or name it {CLOZE_FILE}"
        )
    raise MissingDataError(
        f"missing ROCStories data: put the Story Cloze validation CSV at {folder / CLOZE_FILE} (columns "
        "InputStoryid, InputSentence1..4, RandomFifthSentenceQuiz1/2, AnswerRightEnding; from "
        "https://cs.rochester.edu/nlp/rocstories/), or a ROCStories CSV (storyid, storytitle, "
        "sentence1..sentence5) as the only .csv in that folder"
    )


def rouge_per_item(
    predictions: list[str], references: list[str], use_stemmer: bool = True
) -> list[dict[str, float]]:
    """ROUGE-1/2/L F1 (x100) of each prediction against its reference, with rouge-score."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(
            f"need as many predictions as references (>0), got {len(predictions)} and {len(references)}"
        )
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    out = []
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)  # (target, prediction)
        out.append({k: 100.0 * scores[k].fmeasure for k in ROUGE_TYPES})
    return out


def rouge(predictions: list[str], references: list[str], use_stemmer: bool = True) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (x100) of predictions against references, with rouge-score."""
    items = rouge_per_item(predictions, references, use_stemmer)
    return {k: sum(item[k] for item in items) / len(items) for k in ROUGE_TYPES}


def infill_batch(
    tokenizer, stories: list[Story], blank_length: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    model: A3ForCausalLM | torch.nn.Module,
    tokenizer,
    stories: list[Story],
    config: DecodingConfig = DecodingConfig(temperature=0.0),
    blank_length: int | None = None,
    batch_size: int = 16,
    seed: int = 1234,
    use_stemmer: bool = True,
    progress: bool = True,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Fill sentence 3 of every story. Returns (mean ROUGE-1/2/L F1 x100, one record per story: its
    id, the prompt with the blank shown as [BLANK:n], the reference, the prediction and its ROUGE).

    An A3 model infills as `config` says (default greedy, left to right). A plain causal LM (the AR
    base) cannot see the suffix: it continues sentences 1-2 by the blank's length at config's
    temperature / top-k / top-p, and its fill ends at its first EOS. A random fill order is drawn per
    story from (seed, its tokens, its blank length), so that greedy fills do not depend on batch_size.
    """
    generator = torch.Generator(device=model.device).manual_seed(seed)
    predictions, prompts = [], []
    desc = f"rocstories ({config.mode if isinstance(model, A3ForCausalLM) else 'AR, prefix only'})"
    for start in tqdm(range(0, len(stories), batch_size), desc=desc, disable=not progress):
        batch = stories[start : start + batch_size]
        input_ids, known, attention_mask = infill_batch(tokenizer, batch, blank_length)
        blanks = ~known & attention_mask.bool()
        if isinstance(model, A3ForCausalLM):
            # each story's random fill order from its own tokens: greedy fills do not depend on the batch
            orders = [
                generation_generator(seed, ids[real.bool()].tolist(), int(n))
                for ids, real, n in zip(input_ids, attention_mask, blanks.sum(1), strict=True)
            ]
            out = infill(
                model,
                input_ids.to(model.device),
                known.to(model.device),
                attention_mask.to(model.device),
                config=config,
                generator=generator,
                order_generators=orders,
            )
            fills = [out.sequences[b][blanks[b].to(out.sequences.device)].tolist() for b in range(len(batch))]
        else:
            fills = _ar_fill(model, tokenizer, input_ids, blanks, config, seed + start)
        for b in range(len(batch)):
            predictions.append(tokenizer.decode(fills[b], skip_special_tokens=True).strip())
            prompts.append(_show_blank(tokenizer, input_ids[b], blanks[b], attention_mask[b]))
    references = [s.sentences[2] for s in stories]
    items = rouge_per_item(predictions, references, use_stemmer)
    records = [
        {"id": s.story_id, "prompt": prompt, "reference": ref, "prediction": pred, **scores}
        for s, prompt, ref, pred, scores in zip(stories, prompts, references, predictions, items, strict=True)
    ]
    return {k: sum(item[k] for item in items) / len(items) for k in ROUGE_TYPES}, records


def _ar_fill(model, tokenizer, input_ids, blanks, config: DecodingConfig, seed: int) -> list[list[int]]:
    """Each row's prefix (the known tokens before its blank) continued by the blank's length."""
    starts = blanks.long().argmax(1).tolist()
    lengths = blanks.sum(1).tolist()
    L = max(starts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompt = torch.full((len(starts), L), pad, dtype=torch.long)
    mask = torch.zeros_like(prompt)
    for b, n in enumerate(starts):  # left padding, as generate wants
        prompt[b, L - n :] = input_ids[b, :n]
        mask[b, L - n :] = 1
    rows = ar_generate(
        model,
        prompt.to(model.device),
        mask.to(model.device),
        max(lengths),
        config.temperature,
        config.top_k,
        config.top_p,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad,
        seed=seed,
    )
    return [row[:n] for row, n in zip(rows, lengths, strict=True)]


def _show_blank(tokenizer, ids: torch.Tensor, blank: torch.Tensor, real: torch.Tensor) -> str:
    """The story as the model saw it: prefix [BLANK:n] suffix."""
    first, n = int(blank.long().argmax()), int(blank.sum())
    end = int(real.sum())
    prefix = tokenizer.decode(ids[:first].tolist(), skip_special_tokens=True)
    suffix = tokenizer.decode(ids[first + n : end].tolist(), skip_special_tokens=True)
    return f"{prefix} [BLANK:{n}] {suffix}"

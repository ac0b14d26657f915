"""Held-out NLL per token under each factorization, for A3 models beside their base AR model.

    a3lm nll --model runs/a3/final --model OTHER --base smollm2 --text fortunes:heldout --output nll.json

Rows are built exactly like training rows (`data.PackedLoader`: the row start, then the next
seq_len - 1 tokens of the documents joined by EOS), from the first pass over the text only. Every
factorization scores the same targets (positions 1..n_targets; the row start is context), and the
base model's left-to-right NLL is taken on the same rows, so the numbers are comparable:

    left-to-right, right-to-left     singletons (right-to-left: the last token right after the row start)
    contiguous-2, contiguous-4       left-to-right groups of 2 / 4 (each group predicted jointly)
    random-1, random-2, random-4     groups of 1 / 2 / 4 in a random order (drawn once from `seed`)
    infill-middle                    the middle half blank, everything else known first
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from a3lm import groups
from a3lm.files import check_output_file, model_name, write_json_atomic
from a3lm.model.likelihood import sequence_logprobs
from a3lm.model.modeling import A3ForCausalLM

# the table's rows (factorizations of a row), not fill orders (groups.ORDERS)
FACTORIZATION_NAMES = (
    "left-to-right",
    "right-to-left",
    "contiguous-2",
    "contiguous-4",
    "random-1",
    "random-2",
    "random-4",
    "infill-middle",
)


@dataclass
class Factorization:
    """One way to score the rows: group_ids and target_mask [B, N]."""

    name: str
    description: str
    group_ids: torch.Tensor
    target_mask: torch.Tensor


def factorizations(n_rows: int, n_positions: int, n_targets: int, seed: int) -> list[Factorization]:
    """The table's orders over rows of n_positions whose targets are positions 1..n_targets (position 0
    is the row start; positions after n_targets, if any, are known context). Random orders from `seed`."""
    N, L = n_positions, n_targets
    mask = torch.ones(n_rows, N, dtype=torch.long)
    targets = torch.zeros(n_rows, N, dtype=torch.bool)
    targets[:, 1 : L + 1] = True
    gen = torch.Generator().manual_seed(seed)
    out = [
        Factorization("left-to-right", "singletons, left to right", groups.left_to_right(mask), targets),
        Factorization("right-to-left", "singletons, right to left", groups.right_to_left(mask), targets),
        Factorization("contiguous-2", "groups of 2, left to right", groups.contiguous(mask, 2), targets),
        Factorization("contiguous-4", "groups of 4, left to right", groups.contiguous(mask, 4), targets),
    ]
    for s in (1, 2, 4):
        out.append(
            Factorization(
                f"random-{s}", f"random order, groups of {s}", groups.random_order(mask, s, gen), targets
            )
        )
    known = infill_middle_known(n_rows, N, L)
    blank = (~known[0]).nonzero().squeeze(-1).tolist()
    out.append(
        Factorization(
            "infill-middle",
            f"positions {blank[0]}-{blank[-1]} given both sides, left to right",
            groups.infill_groups(known, mask),
            ~known,
        )
    )
    return out


def infill_middle_known(n_rows: int, n_positions: int, n_targets: int) -> torch.Tensor:
    """Known mask [n_rows, n_positions] of infill-middle: the middle half of the targets (positions
    1..n_targets) blank, everything else known (and so, as infilling, predicted from both sides)."""
    known = torch.ones(n_rows, n_positions, dtype=torch.bool)
    known[:, 1 + n_targets // 4 : 1 + n_targets - n_targets // 4] = False
    return known


@torch.no_grad()
def a3_nlls(
    model: A3ForCausalLM,
    ids: torch.Tensor,
    facts: list[Factorization],
    batch: int = 256,
    on_batch: Any = None,
) -> dict[str, float]:
    """The model's NLL per target token for every factorization. ids [B, N] token rows."""
    was_training = model.training
    model.eval()
    out = {}
    for f in facts:
        total, count = 0.0, 0
        for lo in range(0, ids.shape[0], batch):
            sl = slice(lo, lo + batch)
            lp = sequence_logprobs(model, ids[sl], f.group_ids[sl], target_mask=f.target_mask[sl])
            total, count = total - float(lp.total.sum()), count + int(lp.count.sum())
            if on_batch is not None:
                on_batch(f.name)
        out[f.name] = total / count
    model.train(was_training)
    return out


@torch.no_grad()
def ar_nll(model: nn.Module, ids: torch.Tensor, n_targets: int, batch: int = 256) -> float:
    """A plain causal LM's NLL per token of positions 1..n_targets (each from everything before it)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for lo in range(0, ids.shape[0], batch):
        rows = ids[lo : lo + batch]
        logits = model(input_ids=rows, use_cache=False).logits[:, :n_targets].float()
        total += float(
            F.cross_entropy(logits.flatten(0, 1), rows[:, 1 : n_targets + 1].flatten(), reduction="sum")
        )
    model.train(was_training)
    return total / (ids.shape[0] * n_targets)


def heldout_rows(tokenizer: Any, source: str, seq_len: int, rows: int) -> torch.Tensor:
    """Up to `rows` packed rows [R, seq_len] of `source` (a local file, a named corpus split), built as
    training rows are, from one pass over the text."""
    from a3lm.data.config import DataConfig
    from a3lm.data.loader import PackedLoader, documents, special_ids

    cfg = DataConfig(source=source, seq_len=seq_len, micro_batch_size=1)
    cfg.validate()
    loader = PackedLoader(documents(cfg, tokenizer), cfg, *special_ids(tokenizer))
    out = []
    while len(out) < rows:
        row = loader.next_row()
        if loader.epoch > 0:  # the text ran out: never score a row built from a second pass
            break
        out.append(row)
    if not out:
        raise ValueError(f"{source!r} holds fewer than {seq_len} tokens: not one row of --seq-len {seq_len}")
    return torch.tensor(out, dtype=torch.long)


@dataclass
class NLLConfig:
    text: str = "fortunes:heldout"
    seq_len: int = 128
    rows: int = 16
    batch_size: int = 4
    seed: int = 0

    def validate(self) -> None:
        for name, least in (("seq_len", 2), ("rows", 1), ("batch_size", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(self, name)}")


def _check_same_rows(ids: torch.Tensor, tokenizer: Any, cfg: NLLConfig, who: str) -> None:
    if not torch.equal(heldout_rows(tokenizer, cfg.text, cfg.seq_len, ids.shape[0]), ids):
        raise ValueError(
            f"{who} tokenizes the text differently from the first model: their NLLs are not comparable"
        )


def _finished(output: Path | None, cfg: NLLConfig) -> list[dict[str, Any]]:
    """The results an earlier run with the same settings wrote to `output` (a rerun skips their
    models); an unrelated file there is refused, never overwritten."""
    if output is None or not output.is_file():
        return []
    refuse = f"{output} exists and is not an a3lm nll results file: choose another --output, or delete it"
    try:
        previous = json.loads(output.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{refuse} (not JSON: {e})") from e
    if not (
        isinstance(previous, dict)
        and isinstance(previous.get("settings"), dict)
        and isinstance(previous.get("results"), list)
    ):
        raise ValueError(refuse)
    if {k: previous["settings"].get(k) for k in asdict(cfg)} != asdict(cfg):
        if previous["results"]:
            warnings.warn(
                f"{output} was written with other settings: its {len(previous['results'])} scored "
                "model(s) are discarded and scored again",
                stacklevel=2,
            )
        return []
    return [r for r in previous["results"] if isinstance(r, dict) and {"model", "kind", "nll"} <= set(r)]


def evaluate(
    models: list[str],
    base: str | None,
    cfg: NLLConfig,
    progress: bool = True,
    output: str | Path | None = None,
) -> dict[str, Any]:
    """NLL per token of every factorization for each A3 model (+ the base's left to right); a results dict.

    output: written (atomically) after every model, so an interrupted run keeps what it scored; a
    rerun with the same settings skips the models already there (same path, same model files).
    """
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from a3lm.files import require_a3
    from a3lm.model.convert import load_base, model_fingerprint, resolve_source

    output = None if output is None else check_output_file(output)
    cfg.validate()
    if not models and base is None:
        raise ValueError("nothing to score: give --model (A3 checkpoints) and/or --base")
    for path in models:
        require_a3(path)
    fingerprints = {p: model_fingerprint(p) for p in [*models, *([base] if base else [])]}
    done = {
        (r["model"], r["kind"]): r
        for r in _finished(output, cfg)
        if r.get("fingerprint") == fingerprints.get(r["model"])
    }
    t0 = time.perf_counter()
    tokenizers = [AutoTokenizer.from_pretrained(p, trust_remote_code=False) for p in models]
    base_model = base_tok = None
    if base is not None:
        base_model, base_tok = load_base(resolve_source(base))
    first = tokenizers[0] if tokenizers else base_tok
    ids = heldout_rows(first, cfg.text, cfg.seq_len, cfg.rows)
    for path, tok in zip(models[1:], tokenizers[1:], strict=True):
        _check_same_rows(ids, tok, cfg, path)
    if base_tok is not None and tokenizers:
        _check_same_rows(ids, base_tok, cfg, f"the base {base}")
    n_targets = ids.shape[1] - 1
    facts = factorizations(ids.shape[0], ids.shape[1], n_targets, cfg.seed)
    batches = -(-ids.shape[0] // cfg.batch_size)
    bar = tqdm(
        total=batches * (len(facts) * len(models) + (base is not None)), unit="batch", disable=not progress
    )
    results: list[dict[str, Any]] = []

    def result() -> dict[str, Any]:
        scored = {"rows_scored": ids.shape[0], "targets_per_order": ids.shape[0] * n_targets}
        return {
            "settings": asdict(cfg) | scored,
            "orders": [{"name": f.name, "description": f.description} for f in facts],
            "results": results,
            "wall_time_s": time.perf_counter() - t0,
        }

    def add(path: str, kind: str, score: Any) -> None:
        """One model's row: the earlier run's, or scored now; the file is rewritten after each."""
        kept = done.get((path, kind))
        nll = kept["nll"] if kept is not None else score()
        results.append({"model": path, "kind": kind, "nll": nll, "fingerprint": fingerprints[path]})
        if output is not None and kept is None:
            write_json_atomic(output, result())

    if base is not None:
        bar.set_description("base: left-to-right")
        add(base, "base AR", lambda: {"left-to-right": ar_nll(base_model, ids, n_targets, cfg.batch_size)})
        bar.update(batches)
        del base_model
    for path in models:

        def tick(order: str, path: str = path) -> None:
            bar.set_description(f"{Path(path).name}: {order}")
            bar.update(1)

        def score(path: str = path) -> dict[str, float]:
            model = A3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            return a3_nlls(model, ids, facts, cfg.batch_size, tick)

        add(path, "A3", score)
    bar.close()
    if output is not None:
        write_json_atomic(output, result())
    return result()


def render_table(res: dict[str, Any]) -> str:
    """Markdown: one row per order, one column per model (NLL per token in nats; the base: left to right)."""
    names = [model_name(r["model"]) for r in res["results"]]
    head = (
        "| order | "
        + " | ".join(f"{n} ({r['kind']})" for n, r in zip(names, res["results"], strict=True))
        + " |"
    )
    lines = [head, "|---" * (len(names) + 1) + "|"]
    for order in res["orders"]:
        cells = [
            f"{r['nll'][order['name']]:.3f}" if order["name"] in r["nll"] else "-" for r in res["results"]
        ]
        lines.append(f"| {order['name']} | " + " | ".join(cells) + " |")
    s = res["settings"]
    lines.append(
        f"\nNLL per token (nats) on {s['rows_scored']} rows x {s['seq_len']} tokens of {s['text']!r} "
        f"({s['targets_per_order']} targets per order), seed {s['seed']}."
    )
    return "\n".join(lines)

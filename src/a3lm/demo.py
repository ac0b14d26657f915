"""The ground-truth demo: does the curriculum learn any-order conditionals? Checked against the truth.

    run_demo(DemoConfig(output="runs/demo")) -> DemoResult      (`a3lm demo`)

On the seeded HMM corpus (`synthetic.default_hmm`) every conditional p(x_G | x_{G<k}) is computable
exactly (`exact.py`), so a trained model's NLL per token under any factorization can be put next to
the floor it should reach. The demo, from nothing and offline:

1. corpus + word tokenizer; a held-out set of documents [BOS w_1..w_L EOS] drawn from its own seed;
2. stage 0: a tiny Llama pretrained as a plain AR model           -> <output>/ar
   then, from that checkpoint and with the same step budget:
   the curriculum, stages 1 -> 2 -> 3                            -> <output>/curriculum
   the ablation, stage 3 only (the paper's "no curriculum" row)   -> <output>/ablation
   each run evaluated on the held-out set at a few steps (NLL per word for every factorization);
3. table (markdown + JSON) and a plot of NLL per word vs step for every factorization;
4. generations of every decoding mode, each with its exact log-probability under the source.

Scores are per *word* (BOS is context, EOS is certain under the source and is left out); every
factorization scores the same words with the same group ids for the model and the truth. The run
folders keep the trainer's checkpoints and the demo's evaluations, so rerunning the same command
after an interruption resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from . import exact, groups, sampling, synthetic
from .curriculum import CurriculumConfig, describe, policy_at
from .data import DataConfig
from .likelihood import sequence_logprobs
from .model import A3ForCausalLM
from .tokenizer import word_tokenizer
from .train import (
    AR_DIR,
    FINAL_DIR,
    CheckpointConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    Trainer,
)

EVALS_FILE = "demo_evals.jsonl"
RUNS = ("ar", "curriculum", "ablation")


@dataclass
class DemoConfig:
    """Everything the demo does; `scale` multiplies every step count (the budget knob)."""

    output: str = "runs/demo"
    seed: int = 0
    hmm_seed: int = 0
    length: int = 16  # words per document (rows are [BOS w_1..w_L EOS])
    # model: a tiny Llama
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    # budget
    scale: float = 1.0
    stage0_steps: int = 2000
    stage1_steps: int = 150
    stage2_steps: int = 450
    stage3_steps: int = 1400
    micro_batch_size: int = 64
    stage0_lr: float = 3e-3
    lr: float = 3e-3  # stages 1-3 (the tiny model learns fastest at the stage-0 rate)
    warmup_steps: int = 50
    infill_share: float = 0.1  # share of stage-3 samples with infilling-shaped orders
    block_share: float = 0.0  # share of stage-3 samples with contiguous spans in a random order
    checkpoint_every: int = 200
    # evaluation and generation
    eval_docs: int = 512
    eval_points: int = 8  # evaluations per run (plus step 0)
    gen_samples: int = 64  # samples per decoding mode for the statistics
    gen_show: int = 3  # of which shown as text
    progress: bool = True
    threads: int | None = None  # torch CPU threads; None leaves torch's default (one per core)

    def steps(self, n: int) -> int:
        return max(1, round(n * self.scale))

    @property
    def a3_steps(self) -> int:
        """Steps of the curriculum (stages 1-3), and so of the ablation (stage 3 only)."""
        return self.steps(self.stage1_steps) + self.steps(self.stage2_steps) + self.steps(self.stage3_steps)


def quick_config(output: str) -> DemoConfig:
    """A few steps of everything (tests, a smoke check): minutes become seconds, numbers mean nothing."""
    return DemoConfig(output=output, hidden_size=32, stage0_steps=6, stage1_steps=2, stage2_steps=4, stage3_steps=6,
                      micro_batch_size=8, warmup_steps=1, checkpoint_every=4, eval_docs=16, eval_points=2,
                      gen_samples=4, gen_show=2)


# -- factorizations --------------------------------------------------------------------------------


@dataclass
class Factorization:
    """One way to score the held-out set: group_ids and target_mask [B, N] over rows [BOS w.. EOS]."""

    name: str
    description: str
    group_ids: torch.Tensor
    target_mask: torch.Tensor


def factorizations(n_docs: int, length: int, seed: int) -> list[Factorization]:
    """The table's rows, drawn once (random orders from `seed`), shared by the model and the truth."""
    N = length + 2
    mask = torch.ones(n_docs, N, dtype=torch.long)
    words = torch.zeros(n_docs, N, dtype=torch.bool)
    words[:, 1 : length + 1] = True  # targets: the words (BOS is context, EOS is certain)
    gen = torch.Generator().manual_seed(seed)
    out = [
        Factorization("left-to-right", "singletons, left to right", groups.left_to_right(mask), words),
        Factorization("right-to-left", "singletons, right to left", groups.right_to_left(mask), words),
        Factorization("contiguous-2", "groups of 2, left to right", groups.contiguous(mask, 2), words),
        Factorization("contiguous-4", "groups of 4, left to right", groups.contiguous(mask, 4), words),
    ]
    for s in (1, 2, 4):
        out.append(Factorization(f"random-{s}", f"random order, groups of {s}", groups.random_order(mask, s, gen), words))
    # infilling: the middle half of the words blank, everything else (prefix, suffix, BOS, EOS) known
    lo, hi = 1 + length // 4, 1 + length - length // 4
    known = torch.ones(n_docs, N, dtype=torch.bool)
    known[:, lo:hi] = False
    out.append(Factorization("infill-middle", f"words {lo}-{hi - 1} given both sides, left to right",
                             groups.infill(known, mask), ~known))
    return out


def true_nlls(hmm: synthetic.HMM, words: torch.Tensor, facts: list[Factorization]) -> dict[str, float]:
    """The source's exact NLL per word of every factorization (words [B, L] word indices)."""
    L = words.shape[1]
    return {f.name: exact.true_nll(hmm, words, f.group_ids[:, 1 : L + 1], f.target_mask[:, 1 : L + 1]).nll
            for f in facts}


# -- evaluation of models --------------------------------------------------------------------------


@torch.no_grad()
def a3_nlls(model: A3ForCausalLM, ids: torch.Tensor, facts: list[Factorization], batch: int = 256) -> dict[str, float]:
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
        out[f.name] = total / count
    model.train(was_training)
    return out


def bos_only(f: Factorization) -> torch.Tensor:
    """[B, N] bool: targets whose only visible token is BOS (the first group after it).

    These need the marginal p(x_i), which depends on i. With a single visible content key, attention
    alone cannot tell the positions apart (one score softmaxes to 1 wherever the query sits): only
    the query's attention to its own slot (`A3Config.query_self_attention`) carries its position.
    """
    sees = (f.group_ids[:, None, :] < f.group_ids[:, :, None]).sum(-1)  # [B, N]: earlier-group tokens
    return f.target_mask & (sees == 1)


@torch.no_grad()
def rest_gaps(
    model: A3ForCausalLM, hmm: synthetic.HMM, ids: torch.Tensor, words: torch.Tensor, facts: list[Factorization]
) -> dict[str, float]:
    """Model - true NLL per word over the targets that see more than BOS (see `bos_only`)."""
    model.eval()
    L = words.shape[1]
    out = {}
    for f in facts:
        rest = f.target_mask & ~bos_only(f)
        lp = sequence_logprobs(model, ids, f.group_ids, target_mask=f.target_mask).token  # [B, N]
        true = exact.conditional_logprobs(hmm, words, f.group_ids[:, 1 : L + 1])  # [B, L]
        out[f.name] = float(-(lp[rest]).mean() + true[rest[:, 1 : L + 1]].mean())
    return out


@torch.no_grad()
def ar_nll(model: nn.Module, ids: torch.Tensor, length: int) -> float:
    """A plain causal LM's NLL per word (w_1..w_L from BOS and the words before them)."""
    was_training = model.training
    model.eval()
    logits = model(input_ids=ids, use_cache=False).logits.float()
    nll = F.cross_entropy(logits[:, :length].flatten(0, 1), ids[:, 1 : length + 1].flatten())
    model.train(was_training)
    return float(nll)


class _EvalTrainer(Trainer):
    """The training loop with a per-step hook (evaluations, the demo's progress bar), nothing else changed."""

    def __init__(self, cfg: TrainConfig, on_step: Callable[[Trainer, dict], None]):
        super().__init__(cfg)
        self.on_step = on_step

    def train_step(self) -> dict:
        metrics = super().train_step()
        self.on_step(self, metrics)
        return metrics


def _load_evals(path: Path) -> dict[int, dict[str, float]]:
    if not path.exists():
        return {}
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return {r["step"]: r["nll"] for r in rows}


def _eval_steps(total: int, points: int) -> set[int]:
    return {0, total} | {round(total * k / points) for k in range(1, points)}


# -- decoding ----------------------------------------------------------------------------------------


@dataclass
class Generation:
    """One shown sample: its text (infilled words in [ ]) and exact log-probabilities under the source."""

    mode: str
    text: str
    exact_logprob: float  # log p(x) under the source (-inf: the source cannot produce it)
    exact_conditional: float | None = None  # infilling: log p(blanks | known)


def decoding_modes() -> list[tuple[str, dict[str, Any]]]:
    """(name, sampling kwargs) of every decoding mode shown; infilling is handled apart."""
    return [
        ("group-wise s=1 (left to right)", {"group_size": 1}),
        ("group-wise s=2 (left to right)", {"group_size": 2}),
        ("group-wise s=4 (left to right)", {"group_size": 4}),
        ("group-wise s=1 (random order)", {"group_size": 1, "order": "random"}),
        ("dynamic, confidence, 1 per step", {"dynamic": True, "criterion": "confidence", "per_step": 1}),
        ("dynamic, entropy, 1 per step", {"dynamic": True, "criterion": "entropy", "per_step": 1}),
        ("dynamic, confidence, 2 per step", {"dynamic": True, "criterion": "confidence", "per_step": 2}),
    ]


def _to_words(ids: torch.Tensor, token_to_word: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Word indices [B, L] of rows [BOS w.. ] and whether every token is a word (else: impossible)."""
    w = token_to_word[ids[:, 1 : length + 1].clamp(max=len(token_to_word) - 1)]
    ok = (w >= 0).all(1) & (ids[:, 1 : length + 1] < len(token_to_word)).all(1)
    return w.clamp(min=0), ok


def generate_all(
    model: A3ForCausalLM, hmm: synthetic.HMM, tokenizer: Any, heldout_ids: torch.Tensor, cfg: DemoConfig,
    on_mode: Callable[[str], None] | None = None,
) -> tuple[list[dict], list[Generation]]:
    """Sample every decoding mode; returns (statistics per mode, shown examples).

    Statistics: mean exact NLL per word of `gen_samples` samples (temperature 1) and how many the source
    could not have produced. A perfect model's ancestral samples average the source entropy.
    """
    L, n = cfg.length, cfg.gen_samples
    token_ids = torch.tensor(tokenizer.convert_tokens_to_ids(hmm.words))
    token_to_word = torch.full((len(tokenizer),), -1, dtype=torch.long)
    token_to_word[token_ids] = torch.arange(len(token_ids))
    bos = torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long)
    stats, shown = [], []

    def record(mode: str, ids: torch.Tensor, known: torch.Tensor | None = None) -> None:
        words, ok = _to_words(ids, token_to_word, L)
        joint = exact.joint_logprob(hmm, words).masked_fill(~ok, -math.inf)
        cond = None
        if known is not None:  # infilling: log p(x_blank | x_known) = log p(x) - log p(x_known)
            cond = joint - exact.marginal_logprob(hmm, words, known[:, 1 : L + 1])
        stats.append(_stat(hmm, mode, words, ok, None if known is None else known[:, 1 : L + 1]))
        blanks = L if known is None else int((~known[0, 1 : L + 1]).sum())
        texts = tokenizer.batch_decode(ids[:, 1 : L + 1])
        for b in range(min(cfg.gen_show, n)):
            text = texts[b]
            if known is not None:  # bracket the infilled words
                toks = text.split(" ")
                lo = int((~known[b, 1 : L + 1]).int().argmax())
                text = " ".join(toks[:lo] + ["[", *toks[lo : lo + blanks], "]"] + toks[lo + blanks:])
            shown.append(Generation(mode, text, float(joint[b]), None if cond is None else float(cond[b])))

    for i, (mode, kwargs) in enumerate(decoding_modes()):
        if on_mode:
            on_mode(mode)
        out = sampling.sample(model, bos, length=L, stop_at_eos=False, seed=cfg.seed + i, **kwargs)
        record(mode, out.sequences)
    for i, (mode, kwargs) in enumerate(INFILL_MODES, start=len(decoding_modes())):
        if on_mode:
            on_mode(mode)
        ids = heldout_ids[:n]
        known = _infill_known(ids.shape[0], L)
        out = sampling.infill(model, ids, known, seed=cfg.seed + i, **kwargs)
        record(mode, out.sequences, known)
    return stats, shown


INFILL_MODES = (("infilling middle, s=1 (left to right)", {}),
                ("infilling middle, dynamic confidence", {"dynamic": True, "criterion": "confidence"}))


def _infill_known(n: int, length: int) -> torch.Tensor:
    """[n, L + 2] known mask of rows [BOS w_1..w_L EOS]: the middle half of the words blank."""
    known = torch.ones(n, length + 2, dtype=torch.bool)
    known[:, 1 + length // 4 : 1 + length - length // 4] = False
    return known


def oracle_decode(
    hmm: synthetic.HMM, words: torch.Tensor, known: torch.Tensor, generator: torch.Generator, *,
    group_size: int = 1, order: str = "left-to-right", dynamic: bool = False, criterion: str = "confidence",
    per_step: int = 1,
) -> torch.Tensor:
    """Decode like `sampling` but with the source's exact conditionals in place of the model.

    words, known [n, L] (words at blanks are ignored) -> words [n, L]. Every step draws a token at every
    blank from p(x_i | filled positions) (exact, product of marginals within a group) and commits a
    group (group-wise: the next `group_size` blanks in `order`; dynamic: the best `per_step` by
    `criterion`). What a perfect model would do: the floor for each mode's statistics.
    """
    words, filled = words.clone(), known.clone()
    n, L = words.shape
    blank = ~known
    if order == "random":
        rank = torch.rand(n, L, generator=generator, dtype=torch.float64).masked_fill(known, 2.0).argsort(1).argsort(1)
    else:
        rank = blank.long().cumsum(1) - 1
    group = torch.where(blank, torch.div(rank, group_size, rounding_mode="floor"), -1)
    step = 0
    while not bool(filled.all()):
        probs = exact.posterior_word_logprobs(hmm, words, filled).exp()  # [n, L, W]
        # a group of marginals can commit a combination the source cannot produce: that row's evidence is
        # impossible and its conditionals undefined (NaN); it is lost whatever follows, so fill it uniformly
        probs = torch.where(torch.isfinite(probs).all(-1, keepdim=True), probs, 1.0 / probs.shape[-1])
        tokens = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(n, L)
        if dynamic:
            scores = sampling.criterion_scores(criterion, probs.float(), generator).masked_fill(filled, -math.inf)
            k = min(per_step, int((~filled[0]).sum()))  # every row has the same number of blanks
            commit = torch.zeros_like(filled).scatter(1, scores.topk(k, dim=1).indices, True) & ~filled
        else:
            commit = (group == step) & ~filled
        words = torch.where(commit, tokens, words)
        filled |= commit
        step += 1
    return words


def oracle_stats(hmm: synthetic.HMM, held_words: torch.Tensor, cfg: DemoConfig) -> list[dict]:
    """Every decoding mode's statistics with the true conditionals instead of a model (same n, same modes)."""
    L, n = cfg.length, cfg.gen_samples
    gen = torch.Generator().manual_seed(cfg.seed)
    stats = []
    nothing = torch.zeros(n, L, dtype=torch.bool)
    for mode, kwargs in decoding_modes():
        words = oracle_decode(hmm, torch.zeros(n, L, dtype=torch.long), nothing, gen, **kwargs)
        stats.append(_stat(hmm, mode, words, torch.ones(n, dtype=torch.bool), None))
    for mode, kwargs in INFILL_MODES:
        known = _infill_known(n, L)[:, 1 : L + 1]
        words = oracle_decode(hmm, held_words[:n], known, gen, **kwargs)
        stats.append(_stat(hmm, mode, words, torch.ones(n, dtype=torch.bool), known))
    return stats


def _stat(hmm: synthetic.HMM, mode: str, words: torch.Tensor, ok: torch.Tensor, known: torch.Tensor | None) -> dict:
    """Exact NLL per generated word (infilling: of the blanks given the rest) of the possible samples."""
    joint = exact.joint_logprob(hmm, words).masked_fill(~ok, -math.inf)
    logp = joint if known is None else joint - exact.marginal_logprob(hmm, words, known)
    possible = torch.isfinite(joint)
    per_word = -logp[possible] / (words.shape[1] if known is None else int((~known[0]).sum()))
    return {"mode": mode, "samples": words.shape[0], "impossible": int((~possible).sum()),
            "nll_per_word": float(per_word.mean()) if possible.any() else math.inf}


# -- the demo ----------------------------------------------------------------------------------------


@dataclass
class DemoResult:
    output: Path
    table: list[dict]
    markdown: str
    wall_time_s: float
    files: dict[str, str] = field(default_factory=dict)


def _train_config(cfg: DemoConfig, run: str, model_path: str | None) -> TrainConfig:
    out = Path(cfg.output)
    s = cfg.steps
    if run == "ar":
        cur = CurriculumConfig(stages=[0], stage0_steps=s(cfg.stage0_steps), seed=cfg.seed)
    elif run == "curriculum":
        cur = CurriculumConfig(stages=[1, 2, 3], stage1_steps=s(cfg.stage1_steps), stage2_steps=s(cfg.stage2_steps),
                               stage3_steps=s(cfg.stage3_steps), infill_share=cfg.infill_share,
                               block_share=cfg.block_share, seed=cfg.seed)
    else:  # the ablation: the same budget, all of it in stage 3
        cur = CurriculumConfig(stages=[3], stage3_steps=cfg.a3_steps, infill_share=cfg.infill_share,
                               block_share=cfg.block_share, seed=cfg.seed)
    return TrainConfig(
        output=str(out / run),
        model=ModelConfig(path=model_path, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                          num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                          max_position_embeddings=max(64, cfg.length + 2), init_seed=cfg.seed),
        # stages 1-3 read a different stretch of the (endless) corpus than stage 0 did
        data=DataConfig(seq_len=cfg.length + 2, micro_batch_size=cfg.micro_batch_size, synthetic_length=cfg.length,
                        synthetic_seed=cfg.seed + (0 if run == "ar" else 1), hmm_seed=cfg.hmm_seed),
        curriculum=cur,
        optim=OptimConfig(lr=cfg.lr, stage0_lr=cfg.stage0_lr, warmup_steps=cfg.warmup_steps),
        checkpoint=CheckpointConfig(every=cfg.checkpoint_every, keep=2),
        log=LogConfig(every=10, progress=False),
        device="cpu",
        precision="fp32",
        seed=cfg.seed,
    )


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' load reports and weight-loading bars off: every AR -> A3 load reports the new
    query vector as "MISSING" (expected), and their bars would break the demo's own."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _free(cfg: DemoConfig) -> dict[str, Any]:
    """Fields that may change when resuming: they do not change what is computed."""
    return {"output": cfg.output, "progress": cfg.progress, "threads": cfg.threads}


def _done_steps(run_dir: Path) -> int:
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    return 0 if latest is None else ckpt.step_of(latest)


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run (or resume) the whole demo; writes results.md, results.json and nll_vs_step.png in cfg.output."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    demo_json = out / "demo_config.json"
    if demo_json.exists() and json.loads(demo_json.read_text()) | _free(cfg) != asdict(cfg):
        raise ValueError(f"{out} holds a demo with a different configuration ({demo_json}); choose another --output")
    demo_json.write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    # 1. the source, its tokenizer and a held-out set from a seed no training run reads
    hmm = synthetic.default_hmm(cfg.hmm_seed)
    tokenizer = word_tokenizer(hmm.words, model_max_length=max(64, cfg.length + 2))
    L = cfg.length
    held_words = synthetic.sample(hmm, cfg.eval_docs, L, torch.Generator().manual_seed(10_000 + cfg.seed))
    word_to_token = torch.tensor(tokenizer.convert_tokens_to_ids(hmm.words))
    held_ids = torch.cat([torch.full((cfg.eval_docs, 1), tokenizer.bos_token_id), word_to_token[held_words],
                          torch.full((cfg.eval_docs, 1), tokenizer.eos_token_id)], dim=1)
    facts = factorizations(cfg.eval_docs, L, seed=cfg.seed)
    truth = true_nlls(hmm, held_words, facts)
    entropy = float(-exact.joint_logprob(hmm, held_words).mean()) / L

    # 2. training runs, one progress bar over all of their steps
    configs = {"ar": _train_config(cfg, "ar", None)}
    ar_model_dir = out / "ar" / AR_DIR
    for run in ("curriculum", "ablation"):
        configs[run] = _train_config(cfg, run, str(ar_model_dir))
    totals = {r: configs[r].curriculum.total_steps for r in RUNS}
    done = sum(min(_done_steps(out / r), totals[r]) for r in RUNS)
    bar = tqdm(total=sum(totals.values()), initial=done, unit="step", dynamic_ncols=True, disable=not cfg.progress)
    curves: dict[str, dict[int, dict[str, float]]] = {}
    with _quiet_transformers(), bar:
        for run in RUNS:
            curves[run] = _train_run(run, configs[run], cfg, held_ids, facts, bar)
        bar.set_description("generating")
        # 3. the table: final evaluations of every run
        final = {r: curves[r][totals[r]] for r in RUNS}
        table = []
        for f in facts:
            row = {"order": f.name, "description": f.description, "true": truth[f.name],
                   "curriculum": final["curriculum"][f.name], "ablation": final["ablation"][f.name],
                   "ar": final["ar"]["left-to-right"] if f.name == "left-to-right" else None}
            row["curriculum_gap"] = row["curriculum"] - row["true"]
            row["ablation_gap"] = row["ablation"] - row["true"]
            table.append(row)
        # 4. generations of every decoding mode, from the curriculum's model (statistics for both)
        gens: dict[str, Any] = {}
        shown: list[Generation] = []
        for run in ("curriculum", "ablation"):
            model = A3ForCausalLM.from_pretrained(out / run / FINAL_DIR).eval()
            bar.set_description(f"{run}: gaps past the first group")
            for row, gap in zip(table, rest_gaps(model, hmm, held_ids, held_words, facts).values(), strict=True):
                row[f"{run}_gap_rest"] = gap
            stats, examples = generate_all(model, hmm, tokenizer, held_ids, cfg,
                                           on_mode=lambda m, r=run: bar.set_description(f"{r}: {m}"))
            gens[run] = stats
            if run == "curriculum":
                shown = examples
        bar.set_description("oracle decoding")
        gens["oracle"] = oracle_stats(hmm, held_words, cfg)
    wall = time.perf_counter() - t_start

    result_json = {
        "config": asdict(cfg),
        "source": {"states": len(hmm.states), "words": len(hmm.words), "length": L, "heldout_docs": cfg.eval_docs,
                   "entropy_per_word": entropy},
        "table": table,
        "curves": {r: {str(k): v for k, v in sorted(c.items())} for r, c in curves.items()},
        "stage_boundaries": {"curriculum": [e for _, _, e in configs["curriculum"].curriculum.spans()][:-1]},
        "generation_stats": gens,
        "generations": [asdict(g) for g in shown],
        "wall_time_s": wall,
        "resumed_from_steps": done,  # > 0: wall_time_s covers only this invocation
    }
    result_json["summary"] = summarize(table)
    md = render_markdown(result_json)
    files = {"markdown": str(out / "results.md"), "json": str(out / "results.json"), "plot": str(out / "nll_vs_step.png")}
    Path(files["json"]).write_text(json.dumps(result_json, indent=2) + "\n")
    Path(files["markdown"]).write_text(md)
    plot_curves(result_json, Path(files["plot"]))
    return DemoResult(output=out, table=table, markdown=md, wall_time_s=wall, files=files)


def _train_run(
    run: str, tcfg: TrainConfig, cfg: DemoConfig, held_ids: torch.Tensor, facts: list[Factorization], bar: Any
) -> dict[int, dict[str, float]]:
    """Train (or resume) one run, evaluating at a few steps; returns {step: {order: NLL per word}}."""
    run_dir = Path(tcfg.output)
    total = tcfg.curriculum.total_steps
    want = _eval_steps(total, cfg.eval_points)
    evals_path = run_dir / EVALS_FILE
    evals = _load_evals(evals_path)
    label = {"ar": "pretraining", "curriculum": "curriculum", "ablation": "ablation (stage 3 only)"}[run]

    def evaluate(model: nn.Module, step: int) -> None:
        if step not in want or step in evals:
            return
        bar.set_description(f"{label}: evaluating")
        if run == "ar":
            nll = {"left-to-right": ar_nll(model, held_ids, cfg.length)}
        else:
            nll = a3_nlls(model, held_ids, facts)
        evals[step] = nll
        with open(evals_path, "a") as fh:
            fh.write(json.dumps({"step": step, "nll": nll}) + "\n")

    def on_step(trainer: Trainer, metrics: dict) -> None:
        bar.update(1)
        bar.set_description(f"{label}: {describe(policy_at(tcfg.curriculum, trainer.step - 1))}")
        bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        evaluate(trainer.model, trainer.step)

    bar.set_description(f"{label}: starting")
    trainer = _EvalTrainer(tcfg, on_step)
    evaluate(trainer.model, trainer.step)  # step 0 (or a resumed step that is due)
    trainer.fit()
    if total not in evals:  # finished before this process (e.g. killed between the last step and its evaluation)
        evaluate(trainer.model, total)
    return {k: v for k, v in sorted(evals.items()) if k in want}


# -- reporting ---------------------------------------------------------------------------------------


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return ""
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


TARGET_L2R, TARGET_OTHER = 0.05, 0.1  # nats per word: the bar for the default budget


def summarize(table: list[dict]) -> dict[str, Any]:
    """Targets met or not, and the curriculum vs the ablation (mean gap over every factorization)."""
    l2r = next(r for r in table if r["order"] == "left-to-right")
    others = [r for r in table if r["order"] != "left-to-right"]
    worst = max(others, key=lambda r: r["curriculum_gap"])
    mean = {run: sum(r[f"{run}_gap"] for r in table) / len(table) for run in ("curriculum", "ablation")}
    return {
        "left_to_right_gap": l2r["curriculum_gap"], "left_to_right_target_met": l2r["curriculum_gap"] <= TARGET_L2R,
        "worst_other_order": worst["order"], "worst_other_gap": worst["curriculum_gap"],
        "other_orders_target_met": worst["curriculum_gap"] <= TARGET_OTHER,
        "mean_gap_curriculum": mean["curriculum"], "mean_gap_ablation": mean["ablation"],
        "curriculum_better_than_ablation": mean["curriculum"] < mean["ablation"],
        # the same past the BOS-only first group (absent when the table was made without the split)
        "left_to_right_gap_rest": l2r.get("curriculum_gap_rest"),
        "worst_other_gap_rest": max((r.get("curriculum_gap_rest") or -math.inf) for r in others),
    }


def render_markdown(res: dict) -> str:
    src, c = res["source"], res["config"]
    lines = [
        "# a3lm ground-truth demo",
        "",
        f"Source: seeded HMM ({src['states']} states, {src['words']} words), documents of {src['length']} words; "
        f"{src['heldout_docs']} held-out documents; source entropy {src['entropy_per_word']:.3f} nats/word.",
        f"Model: Llama, hidden {c['hidden_size']}, {c['num_hidden_layers']} layers. Stage 0 (AR): "
        f"{max(1, round(c['stage0_steps'] * c['scale']))} steps; curriculum (stages 1-2-3) and ablation (stage 3 only): "
        f"{sum(max(1, round(c[k] * c['scale'])) for k in ('stage1_steps', 'stage2_steps', 'stage3_steps'))} steps each, "
        f"{c['micro_batch_size']} documents per step. Wall time {res['wall_time_s']:.0f} s"
        + (" (this invocation, which resumed a run)." if res.get("resumed_from_steps") else "."),
        "",
        "NLL per word (nats) on held-out documents; *true* = the source's exact conditionals for the same "
        "factorization; gap = model - true.",
        "",
        "*gap past BOS-only*: the same gap over the words that see more than BOS. Words of the first group "
        "after BOS see BOS alone and must be predicted from their position only (the marginal p(x_i); see "
        "`demo.bos_only`): the hardest conditionals, and the ones the query's own slot exists for.",
        "",
        "| factorization | true | curriculum | gap | gap past BOS-only | ablation (stage 3 only) | gap | "
        "gap past BOS-only | AR (stage 0) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["table"]:
        lines.append(f"| {r['order']} ({r['description']}) | {_fmt(r['true'])} | {_fmt(r['curriculum'])} | "
                     f"{_fmt(r['curriculum_gap'], True)} | {_fmt(r.get('curriculum_gap_rest'), True)} | "
                     f"{_fmt(r['ablation'])} | {_fmt(r['ablation_gap'], True)} | {_fmt(r.get('ablation_gap_rest'), True)} | "
                     f"{_fmt(r['ar'])} |")
    sm = res["summary"]
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    lines += [
        "",
        f"Targets: left to right within {TARGET_L2R} of the truth: {met(sm['left_to_right_target_met'])} "
        f"(gap {sm['left_to_right_gap']:+.3f}); every other order within {TARGET_OTHER}: "
        f"{met(sm['other_orders_target_met'])} (worst: {sm['worst_other_order']}, gap {sm['worst_other_gap']:+.3f}).",
        f"Past the BOS-only first group: left to right {_fmt(sm['left_to_right_gap_rest'], True)}, worst other order "
        f"{_fmt(sm['worst_other_gap_rest'], True)}.",
        f"Curriculum vs ablation: mean gap {sm['mean_gap_curriculum']:+.3f} vs {sm['mean_gap_ablation']:+.3f} nats/word: "
        + ("the curriculum is closer to the truth, as in the paper." if sm["curriculum_better_than_ablation"] else
           "the stage-3-only ablation is as close or closer: the paper's finding does not show at this budget."),
    ]
    lines += ["", "## Decoding modes", "",
              f"Exact NLL per generated word under the source, {c['gen_samples']} samples per mode (temperature 1; "
              f"a perfect model's left-to-right samples average the entropy, {src['entropy_per_word']:.3f}; "
              "infilling: log p(middle | sides) per blank word). Impossible = samples the source cannot produce.", "",
              "*oracle* decodes the same way with the source's exact conditionals in place of a model: what a "
              "perfect model would get (groups are products of marginals, so s > 1 makes impossible sequences "
              "even then).", "",
              "| mode | curriculum NLL/word | impossible | ablation NLL/word | impossible | oracle NLL/word | impossible |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    by = {run: {s["mode"]: s for s in res["generation_stats"][run]} for run in ("ablation", "oracle")}
    for s in res["generation_stats"]["curriculum"]:
        cells = [f"{_fmt(x['nll_per_word'])} | {x['impossible']}/{x['samples']}"
                 for x in (s, by["ablation"][s["mode"]], by["oracle"][s["mode"]])]
        lines.append(f"| {s['mode']} | " + " | ".join(cells) + " |")
    lines += ["", "Examples (curriculum model); log p = exact log-probability under the source:", ""]
    mode = None
    for g in res["generations"]:
        if g["mode"] != mode:
            mode = g["mode"]
            lines.append(f"- **{mode}**")
        extra = "" if g["exact_conditional"] is None else f", log p(middle | sides) = {_fmt(g['exact_conditional'])}"
        lines.append(f"  - `{g['text']}`  (log p = {_fmt(g['exact_logprob'])}{extra})")
    return "\n".join(lines) + "\n"


def plot_curves(res: dict, path: Path) -> None:
    """NLL per word vs step, one panel per factorization: curriculum, ablation, the truth, AR stage 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["table"]
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(rows) / cols), cols, figsize=(4 * cols, 3.2 * math.ceil(len(rows) / cols)),
                             squeeze=False)
    curves = res["curves"]
    ar_total = max(int(k) for k in curves["ar"])
    for ax, r in zip(axes.flat, rows, strict=False):
        name = r["order"]
        for run, style in (("curriculum", "-o"), ("ablation", "--s")):
            xs = [int(k) for k in curves[run]]
            ax.plot(xs, [curves[run][k][name] for k in curves[run]], style, ms=3, label=run)
        if name == "left-to-right":  # stage 0 before step 0 of the any-order runs
            xs = [int(k) - ar_total for k in curves["ar"]]
            ax.plot(xs, [curves["ar"][k][name] for k in curves["ar"]], ":^", ms=3, label="AR (stage 0)")
        ax.axhline(r["true"], color="k", lw=1, label="true")
        for b in res["stage_boundaries"]["curriculum"]:
            ax.axvline(b, color="grey", lw=0.5, ls=":")
        ax.set_title(name, fontsize=10)
        # zoom on the approach to the truth; the untrained start may lie far above, the end must show
        finals = [r["curriculum"], r["ablation"]] + ([r["ar"]] if r["ar"] is not None else [])
        ax.set_ylim(r["true"] - 0.05, max(r["true"] + 1.0, max(finals) + 0.1))
        ax.set_xlabel("step")
        ax.set_ylabel("NLL / word")
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def with_overrides(cfg: DemoConfig, **kw: Any) -> DemoConfig:
    """A copy of cfg with the given non-None fields replaced (the CLI's options)."""
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})


__all__ = ["DemoConfig", "DemoResult", "Factorization", "a3_nlls", "ar_nll", "factorizations", "generate_all",
           "oracle_decode", "oracle_stats", "quick_config", "run_demo", "summarize", "true_nlls", "with_overrides"]

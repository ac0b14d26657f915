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

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from a3lm.data import synthetic
from a3lm.data.loader import DataConfig
from a3lm.decoding.api import infill, sample
from a3lm.decoding.tokens import criterion_scores
from a3lm.demo import exact
from a3lm.evaluation.nll import Factorization, a3_nlls, ar_nll, infill_middle_known
from a3lm.evaluation.nll import factorizations as row_factorizations
from a3lm.files import AR_DIR, CHECKPOINTS_DIR, FINAL_DIR
from a3lm.groups import Order, fill_groups
from a3lm.model.likelihood import sequence_logprobs
from a3lm.model.modeling import A3ForCausalLM
from a3lm.quiet import quiet_transformers
from a3lm.tokenizer import word_tokenizer
from a3lm.training import checkpoint as ckpt
from a3lm.training.callbacks import Callback
from a3lm.training.config import (
    CheckpointConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    scaled,
    stage3_only,
)
from a3lm.training.curriculum import CurriculumConfig, describe, policy_at
from a3lm.training.overrides import apply_overrides, assign
from a3lm.training.trainer import Trainer

EVALS_FILE = "demo_evals.jsonl"
MIN_A3_STEPS, MIN_EVAL_DOCS = 500, 128  # below either, no target or verdict is assessed
RUNS = ("ar", "curriculum", "ablation")


def demo_training(length: int = 16) -> TrainConfig:
    """Every training run of the demo as one config: stage 0 (AR) on documents of `length` words, then
    stages 1-3 (the curriculum); `run_config` splits it into the runs and the stage-3-only ablation."""
    return TrainConfig(
        # 8 heads of 16 dims, not 4 of 32 (the same parameters): any-order conditionals of the
        # HMM need the visible words sorted by distance, and each head attends to about one distance.
        # Stage 3 alone for 2000 steps: random orders +0.06-0.07 nats/word over the truth with 4 heads,
        # +0.02-0.03 with 8 (README, demo section).
        model=ModelConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                          max_position_embeddings=max(64, length + 2)),
        data=DataConfig(seq_len=length + 2, micro_batch_size=64, synthetic_length=length),
        # stage 0: the AR model is within 0.002 nats/word of the truth after 800 steps
        curriculum=CurriculumConfig(stages=[0, 1, 2, 3], stage0_steps=800, stage1_steps=150, stage2_steps=450,
                                    stage3_steps=1400, infill_share=0.1),
        # The tiny model learns fastest at the stage-0 rate in stages 1-3 too. stage_schedule: warmup and
        # decay restart at every stage, so stage 3 starts at the peak LR as the ablation does. Measured
        # (seed 0, 8 heads): the curriculum's worst gap +0.051 with one schedule over stages 1-3, +0.037
        # with a schedule per stage.
        optim=OptimConfig(lr=3e-3, stage0_lr=3e-3, warmup_steps=50, stage_schedule=True),
        checkpoint=CheckpointConfig(every=200, keep=2),
        log=LogConfig(every=10, progress=False),
        device="cpu",
        precision="fp32",
    )


@dataclass
class DemoConfig:
    """Everything the demo does: its training (`train`, split into runs by `run_config`), evaluation and
    reporting. `scale` multiplies every step count (the budget knob); `seed` (and the `seeds` after
    it) replaces every seed of `train`."""

    output: str = "runs/demo"
    seed: int = 0
    scale: float = 1.0
    train: TrainConfig = field(default_factory=demo_training)
    # evaluation and generation
    eval_docs: int = 512
    eval_points: int = 8  # evaluations per run (plus step 0)
    gen_samples: int = 64  # samples per decoding mode for the statistics
    gen_show: int = 3  # of which shown as text
    # noise: repeats of every training run (seeds seed, seed + 1, ...) and bootstrap resamples of
    # the held-out documents
    seeds: int = 1
    bootstrap: int = 1000
    progress: bool = True
    threads: int | None = None  # torch CPU threads; None leaves torch's default (one per core)

    @property
    def length(self) -> int:
        """Words per document: rows are [BOS w_1..w_L EOS]."""
        return self.train.data.synthetic_length

    @property
    def hmm_seed(self) -> int:
        return self.train.data.hmm_seed

    def validate(self) -> None:
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"--scale must be a positive number (it multiplies every step count), got {self.scale}")
        for name in ("seeds", "eval_docs", "eval_points", "gen_samples", "bootstrap"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.train.curriculum.stages != [0, 1, 2, 3]:
            raise ValueError("the demo trains stage 0, then stages 1-3 and the stage-3-only ablation: "
                             f"curriculum.stages must be [0, 1, 2, 3], got {self.train.curriculum.stages}")
        if self.train.data.seq_len != self.length + 2:
            raise ValueError(f"the demo's rows are whole documents: data.seq_len must be data.synthetic_length + 2 "
                             f"= {self.length + 2}, got {self.train.data.seq_len}")
        self.train.validate()

    @property
    def seed_list(self) -> list[int]:
        return [self.seed + k for k in range(self.seeds)]

    @property
    def too_short(self) -> bool:
        """Too few steps or held-out documents for the numbers to mean anything (e.g. `--quick`)."""
        return self.a3_steps < MIN_A3_STEPS or self.eval_docs < MIN_EVAL_DOCS

    @property
    def a3_steps(self) -> int:
        """Steps of the curriculum (stages 1-3), and so of the ablation (stage 3 only)."""
        return run_config(self, "curriculum", self.seed).curriculum.total_steps


def run_dir(cfg: DemoConfig, seed: int, run: str) -> Path:
    """<output>/seed<k>/<run>: one folder per training run."""
    return Path(cfg.output) / f"seed{seed}" / run


def run_config(cfg: DemoConfig, run: str, seed: int) -> TrainConfig:
    """The TrainConfig of one run ("ar": stage 0; "curriculum": stages 1-3 from the AR model;
    "ablation": stage 3 alone for as many steps) of one seed, step counts scaled."""
    t = cfg.train
    steps = {f"stage{k}_steps": scaled(t.curriculum.steps(k), cfg.scale) for k in range(4)}
    cur = replace(t.curriculum, stages=[0] if run == "ar" else [1, 2, 3], seed=seed, **steps)
    run_cfg = replace(
        t, output=str(run_dir(cfg, seed, run)), seed=seed, curriculum=cur,
        model=replace(t.model, path=None if run == "ar" else str(run_dir(cfg, seed, "ar") / AR_DIR), init_seed=seed),
        # stages 1-3 read a different stretch of the (endless) corpus than stage 0 did, and every
        # seed its own stretches
        data=replace(t.data, synthetic_seed=2 * seed + (0 if run == "ar" else 1)),
        optim=copy.copy(t.optim), checkpoint=copy.copy(t.checkpoint), log=copy.copy(t.log),
    )
    return stage3_only(run_cfg) if run == "ablation" else run_cfg


def quick_config(output: str) -> DemoConfig:
    """A few steps of everything (tests, a smoke check): minutes become seconds, numbers mean nothing."""
    train = apply_overrides(demo_training(), [
        "model.hidden_size=32", "curriculum.stage0_steps=6", "curriculum.stage1_steps=2", "curriculum.stage2_steps=4",
        "curriculum.stage3_steps=6", "data.micro_batch_size=8", "optim.warmup_steps=1", "checkpoint.every=4"])
    return DemoConfig(output=output, train=train, eval_docs=16, eval_points=2, gen_samples=4, gen_show=2, bootstrap=100)


def with_overrides(cfg: DemoConfig, overrides: list[str] | None = None, settings: dict[str, Any] | None = None,
                   **kw: Any) -> DemoConfig:
    """A copy of cfg with the given non-None demo fields (`kw`) replaced, then its `train` config's
    typed `settings` ({dotted key: value}) and `key=value` overrides (`-s`) applied."""
    out = replace(cfg, train=copy.deepcopy(cfg.train), **{k: v for k, v in kw.items() if v is not None})
    for key, value in (settings or {}).items():
        assign(out.train, key, value)
    apply_overrides(out.train, overrides or [])
    return out


# -- factorizations --------------------------------------------------------------------------------


def factorizations(n_docs: int, length: int, seed: int) -> list[Factorization]:
    """The table's rows over documents [BOS w_1..w_L EOS]: the words are the targets (EOS is certain
    under the source, so it is known context), random orders drawn once from `seed`."""
    return row_factorizations(n_docs, length + 2, length, seed)


def true_nlls(hmm: synthetic.HMM, words: torch.Tensor, facts: list[Factorization]) -> dict[str, float]:
    """The source's exact NLL per word of every factorization (words [B, L] word indices)."""
    L = words.shape[1]
    return {f.name: exact.true_nll(hmm, words, f.group_ids[:, 1 : L + 1], f.target_mask[:, 1 : L + 1]).nll
            for f in facts}


# -- evaluation of models --------------------------------------------------------------------------


def bos_only(f: Factorization) -> torch.Tensor:
    """[B, N] bool: targets whose only visible token is BOS (the first group after it).

    These need the marginal p(x_i), which depends on i. With a single visible content key, attention
    alone cannot tell the positions apart (one score softmaxes to 1 wherever the query sits): only
    the query's attention to its own slot (`A3Config.query_self_attention`) carries its position.
    """
    sees = (f.group_ids[:, None, :] < f.group_ids[:, :, None]).sum(-1)  # [B, N]: earlier-group tokens
    return f.target_mask & (sees == 1)


def true_token_logprobs(hmm: synthetic.HMM, words: torch.Tensor, facts: list[Factorization]) -> dict[str, torch.Tensor]:
    """The source's exact log p of every target under every factorization: {name: [B, N]} float64, 0 off
    the targets (rows [BOS w_1..w_L EOS]; words [B, L] word indices)."""
    L = words.shape[1]
    out = {}
    for f in facts:
        lp = torch.zeros(f.target_mask.shape, dtype=torch.float64)
        lp[:, 1 : L + 1] = exact.conditional_logprobs(hmm, words, f.group_ids[:, 1 : L + 1])
        out[f.name] = lp.masked_fill(~f.target_mask, 0.0)
    return out


@torch.no_grad()
def model_token_logprobs(
    model: A3ForCausalLM, ids: torch.Tensor, facts: list[Factorization], batch: int = 256
) -> dict[str, torch.Tensor]:
    """The model's log p of every target under every factorization: {name: [B, N]} float64, 0 off the targets."""
    was_training = model.training
    model.eval()
    out = {}
    for f in facts:
        parts = [sequence_logprobs(model, ids[lo : lo + batch], f.group_ids[lo : lo + batch],
                                   target_mask=f.target_mask[lo : lo + batch]).token
                 for lo in range(0, ids.shape[0], batch)]
        out[f.name] = torch.cat(parts).double().masked_fill(~f.target_mask, 0.0)
    model.train(was_training)
    return out


def spread(gaps_KB: torch.Tensor, n_boot: int, seed: int = 0) -> dict[str, Any]:
    """Mean, run-to-run spread and evaluation noise of a per-document quantity.

    gaps_KB [K seeds, B documents] (e.g. one document's gap per word) -> the mean over both; `sd`, the
    standard deviation of the per-seed means (None for one seed); `ci`, a 95% bootstrap interval of
    the mean over documents (the same resampled documents for every seed: the held-out set is shared).
    """
    K, B = gaps_KB.shape
    per_seed = gaps_KB.mean(1)
    idx = torch.randint(B, (n_boot, B), generator=torch.Generator().manual_seed(seed))
    boot = gaps_KB[:, idx].mean(-1).mean(0)  # [n_boot]
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=boot.dtype)).tolist()
    return {"mean": float(per_seed.mean()), "sd": float(per_seed.std()) if K > 1 else None,
            "per_seed": per_seed.tolist(), "ci": [lo, hi]}


def doc_gaps(model_lp: torch.Tensor, true_lp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each document's gap per target word, model NLL - true NLL: [B] from [B, N] log-probs and targets."""
    return ((true_lp - model_lp) * targets).sum(1) / targets.sum(1)


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
        out = sample(model, bos, length=L, stop_at_eos=False, seed=cfg.seed + i, **kwargs)
        record(mode, out.sequences)
    for i, (mode, kwargs) in enumerate(INFILL_MODES, start=len(decoding_modes())):
        if on_mode:
            on_mode(mode)
        ids = heldout_ids[:n]
        known = infill_middle_known(ids.shape[0], L + 2, L)
        out = infill(model, ids, known, seed=cfg.seed + i, **kwargs)
        record(mode, out.sequences, known)
    return stats, shown


INFILL_MODES = (("infilling middle, s=1 (left to right)", {}),
                ("infilling middle, dynamic confidence", {"dynamic": True, "criterion": "confidence"}))


def oracle_decode(
    hmm: synthetic.HMM, words: torch.Tensor, known: torch.Tensor, generator: torch.Generator, *,
    group_size: int = 1, order: Order = "left-to-right", dynamic: bool = False, criterion: str = "confidence",
    per_step: int = 1,
) -> torch.Tensor:
    """Decode like `sampling` but with the source's exact conditionals in place of the model.

    words, known [n, L] (words at blanks are ignored) -> words [n, L]. Every step draws a token at every
    blank from p(x_i | filled positions) (exact, product of marginals within a group) and commits a
    group (group-wise: the next `group_size` blanks in `order`, grouped by `groups.fill_groups` as
    `sampling` groups them; dynamic: the best `per_step` by
    `criterion`). What a perfect model would do: the floor for each mode's statistics.
    """
    words, filled = words.clone(), known.clone()
    n, L = words.shape
    group = fill_groups(~known, order, group_size, generator)
    step = 0
    while not bool(filled.all()):
        probs = exact.posterior_word_logprobs(hmm, words, filled).exp()  # [n, L, W]
        # a group of marginals can commit a combination the source cannot produce: that row's evidence is
        # impossible and its conditionals undefined (NaN); it is lost whatever follows, so fill it uniformly
        probs = torch.where(torch.isfinite(probs).all(-1, keepdim=True), probs, 1.0 / probs.shape[-1])
        tokens = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(n, L)
        if dynamic:
            scores = criterion_scores(criterion, probs.float(), generator).masked_fill(filled, -math.inf)
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
        known = infill_middle_known(n, L + 2, L)[:, 1 : L + 1]
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


def _free(cfg: DemoConfig) -> dict[str, Any]:
    """Fields that may change when resuming: they do not change what is computed."""
    return {"output": cfg.output, "progress": cfg.progress, "threads": cfg.threads}


def _done_steps(run_dir: Path) -> int:
    latest = ckpt.latest_checkpoint(run_dir / CHECKPOINTS_DIR)
    return 0 if latest is None else ckpt.step_of(latest)


@dataclass
class HeldOut:
    """The held-out set every run is scored on: documents, token rows, factorizations, exact log-probs."""

    words: torch.Tensor  # [B, L] word indices
    ids: torch.Tensor  # [B, L + 2] token rows [BOS w.. EOS]
    facts: list[Factorization]
    true_lp: dict[str, torch.Tensor]  # {factorization: [B, L + 2]} exact log p of the targets

    def truth(self, name: str) -> float:
        f = next(f for f in self.facts if f.name == name)
        return float(-self.true_lp[name].sum() / f.target_mask.sum())


def held_out_set(cfg: DemoConfig, hmm: synthetic.HMM, tokenizer: Any) -> HeldOut:
    """Documents from a seed no training run reads (the same for every seed of a `--seeds` run)."""
    L, n = cfg.length, cfg.eval_docs
    words = synthetic.sample_documents(hmm, n, L, torch.Generator().manual_seed(10_000 + cfg.seed))
    word_to_token = torch.tensor(tokenizer.convert_tokens_to_ids(hmm.words))
    ids = torch.cat([torch.full((n, 1), tokenizer.bos_token_id), word_to_token[words],
                     torch.full((n, 1), tokenizer.eos_token_id)], dim=1)
    facts = factorizations(n, L, seed=cfg.seed)
    return HeldOut(words, ids, facts, true_token_logprobs(hmm, words, facts))


def _open_output(cfg: DemoConfig) -> Path:
    """cfg.output, refused if it holds a demo of another configuration; the configuration recorded."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    demo_json = out / "demo_config.json"
    if demo_json.exists() and json.loads(demo_json.read_text()) | _free(cfg) != asdict(cfg):
        raise ValueError(f"{out} holds a demo with a different configuration ({demo_json}); choose another --output")
    demo_json.write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return out


def _train_all(cfg: DemoConfig, configs: dict[tuple[int, str], TrainConfig], held: HeldOut,
               bar: Any) -> tuple[dict, dict]:
    """Every run in order (each seed: AR, then the curriculum and the ablation from it);
    returns ({seed: {run: curve}}, {seed: {run: wall seconds}})."""
    curves: dict[int, dict[str, dict[int, dict[str, float]]]] = {s: {} for s in cfg.seed_list}
    train_wall: dict[int, dict[str, float]] = {s: {} for s in cfg.seed_list}
    for (s, run), tcfg in configs.items():
        t0 = time.perf_counter()
        curves[s][run] = _train_run(run, tcfg, cfg, held, bar, seed_note=f"seed {s}: " if cfg.seeds > 1 else "")
        train_wall[s][run] = time.perf_counter() - t0
    return curves, train_wall


def _final_model(cfg: DemoConfig, seed: int, run: str) -> A3ForCausalLM:
    return A3ForCausalLM.from_pretrained(run_dir(cfg, seed, run) / FINAL_DIR)


def _generations(cfg: DemoConfig, hmm: synthetic.HMM, tokenizer: Any, held: HeldOut,
                 bar: Any) -> tuple[dict[str, Any], list[Generation]]:
    """Every decoding mode's statistics from the first seed's models and the oracle; the curriculum's examples."""
    gens: dict[str, Any] = {}
    shown: list[Generation] = []
    for run in ("curriculum", "ablation"):
        model = _final_model(cfg, cfg.seed, run).eval()
        stats, examples = generate_all(model, hmm, tokenizer, held.ids, cfg,
                                       on_mode=lambda m, r=run: bar.set_description(f"{r}: {m}"))
        gens[run] = stats
        if run == "curriculum":
            shown = examples
    bar.set_description("oracle decoding")
    gens["oracle"] = oracle_stats(hmm, held.words, cfg)
    return gens, shown


def run_steps(cfg: DemoConfig) -> dict[str, Any]:
    """The step counts the runs train (scaled): stage 0, each curriculum stage, the ablation."""
    cur = run_config(cfg, "curriculum", cfg.seed).curriculum
    return {"ar": run_config(cfg, "ar", cfg.seed).curriculum.total_steps,
            "curriculum": [e - b for _, b, e in cur.spans()],
            "ablation": run_config(cfg, "ablation", cfg.seed).curriculum.total_steps}


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run (or resume) the whole demo; writes results.md, results.json and nll_vs_step.png in cfg.output."""
    from tqdm.auto import tqdm

    cfg.validate()
    t_start = time.perf_counter()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out = _open_output(cfg)
    # 1. the source, its tokenizer and the held-out set
    hmm = synthetic.default_hmm(cfg.hmm_seed)
    tokenizer = word_tokenizer(hmm.words, model_max_length=cfg.train.model.max_position_embeddings)
    held = held_out_set(cfg, hmm, tokenizer)
    # 2. training runs, one progress bar over all of them
    configs = {(s, r): run_config(cfg, r, s) for s in cfg.seed_list for r in RUNS}
    totals = {k: c.curriculum.total_steps for k, c in configs.items()}
    done = sum(min(_done_steps(Path(c.output)), totals[k]) for k, c in configs.items())
    bar = tqdm(total=sum(totals.values()), initial=done, unit="step", dynamic_ncols=True, disable=not cfg.progress)
    with quiet_transformers(reports=False), bar:
        curves, train_wall = _train_all(cfg, configs, held, bar)
        # 3. the table: every seed's final models on every factorization, per document
        bar.set_description("final evaluation")
        lps = {(s, r): model_token_logprobs(_final_model(cfg, s, r), held.ids, held.facts)
               for s in cfg.seed_list for r in ("curriculum", "ablation")}
        table = build_table(cfg, held, lps, [curves[s]["ar"][totals[(s, "ar")]]["left-to-right"] for s in cfg.seed_list])
        # 4. generations of every decoding mode from the first seed's models, and with the oracle
        gens, shown = _generations(cfg, hmm, tokenizer, held, bar)
    result_json = {
        "config": asdict(cfg),
        "steps": run_steps(cfg),
        "source": {"states": len(hmm.states), "words": len(hmm.words), "length": cfg.length,
                   "heldout_docs": cfg.eval_docs, "entropy_per_word": float(-exact.joint_logprob(hmm, held.words).mean()) / cfg.length},
        "table": table,
        "verdict": verdict(cfg, held, lps),
        "curves": {str(s): {r: {str(k): v for k, v in sorted(c.items())} for r, c in runs.items()}
                   for s, runs in curves.items()},
        "stage_boundaries": {"curriculum": [e for _, _, e in configs[(cfg.seed, "curriculum")].curriculum.spans()][:-1]},
        "generation_stats": gens,
        "generations": [asdict(g) for g in shown],
        "wall_time_s": time.perf_counter() - t_start,
        "train_wall_s": {str(s): w for s, w in train_wall.items()},
        "resumed_from_steps": done,  # > 0: wall_time_s covers only this invocation
        "summary": summarize(table, cfg.too_short),
    }
    return _write_results(out, result_json)


def _write_results(out: Path, result_json: dict[str, Any]) -> DemoResult:
    md = render_markdown(result_json)
    files = {"markdown": str(out / "results.md"), "json": str(out / "results.json"), "plot": str(out / "nll_vs_step.png")}
    Path(files["json"]).write_text(json.dumps(result_json, indent=2) + "\n")
    Path(files["markdown"]).write_text(md)
    plot_curves(result_json, Path(files["plot"]))
    return DemoResult(output=out, table=result_json["table"], markdown=md, wall_time_s=result_json["wall_time_s"],
                      files=files)


def build_table(cfg: DemoConfig, held: HeldOut, lps: dict[tuple[int, str], dict[str, torch.Tensor]],
                ar_final: list[float]) -> list[dict]:
    """One row per factorization: the truth, and per run the NLL and the gap (mean, spread, bootstrap
    interval over documents, and the gap past the BOS-only first group)."""
    table = []
    for f in held.facts:
        true = held.truth(f.name)
        row: dict[str, Any] = {"order": f.name, "description": f.description, "true": true,
                               "ar": sum(ar_final) / len(ar_final) if f.name == "left-to-right" else None}
        rest = f.target_mask & ~bos_only(f)
        for run in ("curriculum", "ablation"):
            per_seed = [lps[(s, run)][f.name] for s in cfg.seed_list]
            gaps = torch.stack([doc_gaps(lp, held.true_lp[f.name], f.target_mask) for lp in per_seed])  # [K, B]
            st = spread(gaps, cfg.bootstrap)
            row[run] = true + st["mean"]
            row[f"{run}_gap"] = st["mean"]
            row[f"{run}_gap_sd"], row[f"{run}_gap_ci"], row[f"{run}_gap_seeds"] = st["sd"], st["ci"], st["per_seed"]
            row[f"{run}_gap_rest"] = sum(float(((held.true_lp[f.name] - lp) * rest).sum() / rest.sum())
                                         for lp in per_seed) / len(per_seed)
        table.append(row)
    return table


def verdict(cfg: DemoConfig, held: HeldOut, lps: dict[tuple[int, str], dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Curriculum vs ablation: the difference of their gaps averaged over the table's factorizations,
    paired by seed and document; stated only when it exceeds both the run-to-run spread and the
    evaluation noise."""
    diffs = []
    for s in cfg.seed_list:
        d = [doc_gaps(lps[(s, "curriculum")][f.name], held.true_lp[f.name], f.target_mask)
             - doc_gaps(lps[(s, "ablation")][f.name], held.true_lp[f.name], f.target_mask) for f in held.facts]
        diffs.append(torch.stack(d).mean(0))
    st = spread(torch.stack(diffs), cfg.bootstrap)
    lo, hi = st["ci"]
    if cfg.too_short:
        text = "too short to mean anything: no verdict"
    elif st["sd"] is None:
        text = "one seed: the run-to-run spread is not measured, so no verdict (use --seeds 3)"
    elif abs(st["mean"]) > st["sd"] and (lo > 0 or hi < 0):
        text = ("the curriculum is closer to the truth than the stage-3-only ablation" if st["mean"] < 0 else
                "the stage-3-only ablation is closer to the truth than the curriculum")
    else:
        text = "no difference at this budget"
    return {"difference": st, "text": text}


class Evaluations(Callback):
    """The held-out NLL per word of one run at a few steps, appended to <run>/demo_evals.jsonl: a
    resumed run keeps the evaluations it has and makes only those still due."""

    def __init__(self, run: str, tcfg: TrainConfig, cfg: DemoConfig, held: HeldOut, on_start: Callable[[], None]):
        self.run, self.held, self.length, self.on_start = run, held, cfg.length, on_start
        self.want = _eval_steps(tcfg.curriculum.total_steps, cfg.eval_points)
        self.path = Path(tcfg.output) / EVALS_FILE
        self.evals = _load_evals(self.path)

    def evaluate(self, model: nn.Module, step: int) -> None:
        if step not in self.want or step in self.evals:
            return
        self.on_start()
        if self.run == "ar":
            nll = {"left-to-right": ar_nll(model, self.held.ids, self.length)}
        else:
            nll = a3_nlls(model, self.held.ids, self.held.facts)
        self.evals[step] = nll
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, "nll": nll}) + "\n")

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.evaluate(trainer.model, trainer.step)

    def curve(self) -> dict[int, dict[str, float]]:
        """{step: {order: NLL per word}} at the wanted steps."""
        return {k: v for k, v in sorted(self.evals.items()) if k in self.want}


class SharedBar(Callback):
    """One progress bar over every run of the demo: the run's label, its stage and loss."""

    def __init__(self, bar: Any, label: str):
        self.bar, self.label = bar, label

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.bar.update(1)
        self.bar.set_description(f"{self.label}: {describe(policy_at(trainer.cfg.curriculum, trainer.step - 1))}")
        self.bar.set_postfix(loss=f"{metrics['loss']:.3f}")


RUN_LABELS = {"ar": "pretraining", "curriculum": "curriculum", "ablation": "ablation (stage 3 only)"}


def _train_run(
    run: str, tcfg: TrainConfig, cfg: DemoConfig, held: HeldOut, bar: Any, seed_note: str = ""
) -> dict[int, dict[str, float]]:
    """Train (or resume) one run, evaluating at a few steps; returns {step: {order: NLL per word}}."""
    label = seed_note + RUN_LABELS[run]
    evals = Evaluations(run, tcfg, cfg, held, on_start=lambda: bar.set_description(f"{label}: evaluating"))
    bar.set_description(f"{label}: starting")
    trainer = Trainer(tcfg, callbacks=[SharedBar(bar, label), evals])
    evals.evaluate(trainer.model, trainer.step)  # step 0 (or a resumed step that is due)
    trainer.fit()
    # finished before this process (e.g. killed between the last step and its evaluation)
    evals.evaluate(trainer.model, tcfg.curriculum.total_steps)
    return evals.curve()


# -- reporting ---------------------------------------------------------------------------------------


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return ""
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


TARGET = 0.05  # nats per word: every factorization's gap at the default budget


def _gap_cell(r: dict, run: str) -> str:
    """'+0.012 ± 0.004 [+0.008, +0.016]': mean over seeds ± their sd, then the bootstrap interval."""
    sd = r.get(f"{run}_gap_sd")
    ci = r.get(f"{run}_gap_ci")
    return (_fmt(r[f"{run}_gap"], True) + ("" if sd is None else f" ± {sd:.3f}")
            + ("" if ci is None else f" [{ci[0]:+.3f}, {ci[1]:+.3f}]"))


def summarize(table: list[dict], too_short: bool = False) -> dict[str, Any]:
    """The target (every factorization within TARGET of the truth, for the curriculum), met or not."""
    worst = max(table, key=lambda r: r["curriculum_gap"])
    worst_abl = max(table, key=lambda r: r["ablation_gap"])
    return {
        "too_short": too_short, "target": TARGET,
        "worst_order": worst["order"], "worst_gap": worst["curriculum_gap"],
        "target_met": None if too_short else worst["curriculum_gap"] <= TARGET,
        "ablation_worst_order": worst_abl["order"], "ablation_worst_gap": worst_abl["ablation_gap"],
        "mean_gap_curriculum": sum(r["curriculum_gap"] for r in table) / len(table),
        "mean_gap_ablation": sum(r["ablation_gap"] for r in table) / len(table),
        "worst_gap_rest": max(r["curriculum_gap_rest"] for r in table),
    }


def _header(res: dict) -> list[str]:
    src, c, steps = res["source"], res["config"], res["steps"]
    model, optim = c["train"]["model"], c["train"]["optim"]
    seeds = c["seeds"]
    decay = f"warmup + {optim['decay']} decay"
    sched = f"{decay} per stage" if optim["stage_schedule"] else f"one {decay} over stages 1-3"
    return [
        "# a3lm ground-truth demo",
        "",
        f"Source: seeded HMM ({src['states']} states, {src['words']} words), documents of {src['length']} words; "
        f"{src['heldout_docs']} held-out documents; source entropy {src['entropy_per_word']:.3f} nats/word.",
        f"Model: {model['family'].capitalize()}, hidden {model['hidden_size']}, {model['num_hidden_layers']} layers, "
        f"{model['num_attention_heads']} heads ({model['num_key_value_heads']} KV). "
        f"Stage 0 (AR): {steps['ar']} steps; curriculum (stages 1-2-3: {' + '.join(map(str, steps['curriculum']))} "
        f"steps, {sched}) and ablation (stage 3 only) at the same budget, "
        f"{c['train']['data']['micro_batch_size']} documents per step. "
        + (f"Every training run repeated with {seeds} seeds ({c['seed']}..{c['seed'] + seeds - 1}). " if seeds > 1 else
           f"One seed ({c['seed']}). ")
        + f"Wall time {res['wall_time_s']:.0f} s"
        + (" (this invocation, which resumed a run)." if res.get("resumed_from_steps") else "."),
        "",
    ]


def render_markdown(res: dict) -> str:
    c, sm = res["config"], res["summary"]
    lines = _header(res)
    if sm["too_short"]:
        lines += [f"**Too short to mean anything** (fewer than {MIN_A3_STEPS} curriculum steps or {MIN_EVAL_DOCS} "
                  "held-out documents): the numbers below check that everything runs; no target or verdict is "
                  "assessed.", ""]
    noise = ("mean over seeds ± their standard deviation, " if c["seeds"] > 1 else "") + \
        "[95% bootstrap interval over held-out documents]"
    lines += [
        "NLL per word (nats) on held-out documents; *exact* = the source's own conditionals for the same "
        f"factorization; gap = model - exact: {noise}.",
        "",
        "*past BOS-only*: the gap over the words that see more than BOS. The first group after BOS sees BOS "
        "alone and must be predicted from its position only (the marginal p(x_i); see `demo.bos_only`).",
        "",
        "| factorization | exact | curriculum gap | past BOS-only | ablation (stage 3 only) gap | past BOS-only | "
        "AR (stage 0) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["table"]:
        lines.append(f"| {r['order']} ({r['description']}) | {_fmt(r['true'])} | {_gap_cell(r, 'curriculum')} | "
                     f"{_fmt(r['curriculum_gap_rest'], True)} | {_gap_cell(r, 'ablation')} | "
                     f"{_fmt(r['ablation_gap_rest'], True)} | {_fmt(r['ar'])} |")
    v = res["verdict"]["difference"]
    lines += [""]
    if not sm["too_short"]:
        lines.append(f"Target, every factorization within {TARGET} nats/word of the exact NLL (curriculum): "
                     + ("met" if sm["target_met"] else "NOT met")
                     + f" (worst: {sm['worst_order']}, {sm['worst_gap']:+.3f}; ablation's worst: "
                     f"{sm['ablation_worst_order']}, {sm['ablation_worst_gap']:+.3f}).")
    lines.append(f"Curriculum vs ablation, gap difference averaged over the factorizations: {v['mean']:+.3f}"
                 + ("" if v["sd"] is None else f" ± {v['sd']:.3f} over seeds")
                 + f" [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]: {res['verdict']['text']}.")
    lines += _decoding_lines(res)
    return "\n".join(lines) + "\n"


def _decoding_lines(res: dict) -> list[str]:
    src, c = res["source"], res["config"]
    lines = ["", "## Decoding modes", "",
             f"Samples of the first seed's models, {c['gen_samples']} per mode (temperature 1), scored under the source. "
             "*impossible*: samples the source cannot produce (a word it never emits there, or a special token); "
             "*NLL/word*: exact NLL per generated word, averaged over the **possible** samples only (the impossible "
             f"ones have infinite NLL and are excluded). A perfect model's left-to-right samples average the entropy, "
             f"{src['entropy_per_word']:.3f}; infilling: log p(middle | sides) per blank word.", "",
             "*oracle* decodes the same way with the source's exact conditionals in place of a model: what a "
             "perfect model would get (groups are products of marginals, so s > 1 makes impossible sequences "
             "even then).", "",
             "| mode | curriculum impossible | NLL/word | ablation impossible | NLL/word | oracle impossible | NLL/word |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    by = {run: {s["mode"]: s for s in res["generation_stats"][run]} for run in ("ablation", "oracle")}
    for s in res["generation_stats"]["curriculum"]:
        cells = [f"{x['impossible']}/{x['samples']} | {_fmt(x['nll_per_word'])}"
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
    return lines


RUN_STYLE = {"curriculum": dict(color="C0", marker="o", ls="-"), "ablation": dict(color="C1", marker="s", ls="--"),
             "ar": dict(color="C2", marker="^", ls=":")}
RUN_LABEL = {"curriculum": "curriculum (stages 1-2-3)", "ablation": "ablation (stage 3 only)", "ar": "AR (stage 0)"}


def _mean_curve(curves: dict, run: str, name: str) -> tuple[list[int], list[float]]:
    """Steps and the NLL of `name` averaged over the seeds that evaluated every step."""
    per_seed = [c[run] for c in curves.values()]
    steps = sorted(set.intersection(*(set(map(int, c)) for c in per_seed)))
    return steps, [sum(c[str(k)][name] for c in per_seed) / len(per_seed) for k in steps]


def plot_curves(res: dict, path: Path) -> None:
    """NLL per word vs step, one panel per factorization: curriculum, ablation, AR stage 0 and the truth
    (a line); the curriculum's stages shaded and named; one legend for every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, curves = res["table"], res["curves"]
    cols = 4
    n_rows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4 * cols, 3.1 * n_rows + 0.8), squeeze=False)
    bounds = res["stage_boundaries"]["curriculum"]
    a3_total = max(int(k) for c in curves.values() for k in c["curriculum"])
    ar_total = max(int(k) for c in curves.values() for k in c["ar"])
    edges = [0, *bounds, a3_total]
    for ax, r in zip(axes.flat, rows, strict=False):
        name = r["order"]
        spans = [(f"stage {i + 1}", lo, hi) for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True))]
        if name == "left-to-right":
            spans.insert(0, ("stage 0 (AR)", -ar_total, 0))
        width = spans[-1][2] - spans[0][1]
        for i, (label, lo, hi) in enumerate(spans):
            ax.axvspan(lo, hi, color="0.94" if i % 2 == 0 else "0.86", lw=0, zorder=0)
            if (hi - lo) < 0.15 * width:  # a narrow stage: its number only
                label = label.split()[1]
            ax.text((lo + hi) / 2, 0.97, label, transform=ax.get_xaxis_transform(), ha="center", va="top",
                    fontsize=7, color="0.3")
        runs = ("curriculum", "ablation") + (("ar",) if name == "left-to-right" else ())
        for run in runs:
            for c in curves.values() if len(curves) > 1 else ():  # each seed, faintly
                xs = sorted(map(int, c[run]))
                ax.plot([x - (ar_total if run == "ar" else 0) for x in xs], [c[run][str(x)][name] for x in xs],
                        color=RUN_STYLE[run]["color"], lw=0.6, alpha=0.35)
            xs, ys = _mean_curve(curves, run, name)
            if run == "ar":  # stage 0 runs before step 0 of the any-order runs
                xs = [x - ar_total for x in xs]
            ax.plot(xs, ys, ms=3, label=RUN_LABEL[run], **RUN_STYLE[run])
        ax.axhline(r["true"], color="k", lw=1.2, label="exact NLL (the source)")
        ax.set_title(f"{name}  (exact {r['true']:.3f})", fontsize=10)
        # zoom on the approach to the truth; the untrained start may lie far above, the end must show
        finals = [r["curriculum"], r["ablation"]] + ([r["ar"]] if r["ar"] is not None else [])
        ax.set_ylim(r["true"] - 0.05, max(r["true"] + 0.6, max(finals) + 0.1))
        ax.set_xlabel("step (stage 0 before 0)" if name == "left-to-right" else "step")
        ax.set_ylabel("NLL / word")
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()  # the first panel has every series
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.95), ncol=len(labels), fontsize=9,
               frameon=False)
    seeds = res["config"]["seeds"]
    fig.suptitle("held-out NLL per word vs training step; shaded: the curriculum's stages"
                 + (f"; mean of {seeds} seeds (faint: each seed)" if seeds > 1 else ""), y=0.995, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.91))
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""The demo's configuration: its runs, their training configs, and the quick and scaled variants."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from a3lm.data.config import DataConfig
from a3lm.files import AR_DIR
from a3lm.training.config import (
    CheckpointConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    scaled,
    stage3_only,
)
from a3lm.training.curriculum import CurriculumConfig
from a3lm.training.overrides import apply_overrides, assign

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
        model=ModelConfig(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=max(64, length + 2),
        ),
        data=DataConfig(seq_len=length + 2, micro_batch_size=64, synthetic_length=length),
        # stage 0: the AR model is within 0.002 nats/word of the truth after 800 steps
        curriculum=CurriculumConfig(
            stages=[0, 1, 2, 3],
            stage0_steps=800,
            stage1_steps=150,
            stage2_steps=450,
            stage3_steps=1400,
            infill_share=0.1,
        ),
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
            raise ValueError(
                f"--scale must be a positive number (it multiplies every step count), got {self.scale}"
            )
        for name in ("seeds", "eval_docs", "eval_points", "gen_samples", "bootstrap"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1 (or left out for torch's default), got {self.threads}")
        if self.train.curriculum.stages != [0, 1, 2, 3]:
            raise ValueError(
                "the demo trains stage 0, then stages 1-3 and the stage-3-only ablation: "
                f"curriculum.stages must be [0, 1, 2, 3], got {self.train.curriculum.stages}"
            )
        if self.train.data.seq_len != self.length + 2:
            raise ValueError(
                f"the demo's rows are whole documents: data.seq_len must be data.synthetic_length + 2 "
                f"= {self.length + 2}, got {self.train.data.seq_len}"
            )
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
        t,
        output=str(run_dir(cfg, seed, run)),
        seed=seed,
        curriculum=cur,
        model=replace(
            t.model, path=None if run == "ar" else str(run_dir(cfg, seed, "ar") / AR_DIR), init_seed=seed
        ),
        # stages 1-3 read a different stretch of the (endless) corpus than stage 0 did, and every
        # seed its own stretches
        data=replace(t.data, synthetic_seed=2 * seed + (0 if run == "ar" else 1)),
        optim=copy.copy(t.optim),
        checkpoint=copy.copy(t.checkpoint),
        log=copy.copy(t.log),
    )
    return stage3_only(run_cfg) if run == "ablation" else run_cfg


def quick_config(output: str) -> DemoConfig:
    """A few steps of everything (tests, a smoke check): minutes become seconds, numbers mean nothing."""
    train = apply_overrides(
        demo_training(),
        [
            "model.hidden_size=32",
            "curriculum.stage0_steps=6",
            "curriculum.stage1_steps=2",
            "curriculum.stage2_steps=4",
            "curriculum.stage3_steps=6",
            "data.micro_batch_size=8",
            "optim.warmup_steps=1",
            "checkpoint.every=4",
        ],
    )
    return DemoConfig(
        output=output, train=train, eval_docs=16, eval_points=2, gen_samples=4, gen_show=2, bootstrap=100
    )


def with_overrides(
    cfg: DemoConfig, overrides: list[str] | None = None, settings: dict[str, Any] | None = None, **kw: Any
) -> DemoConfig:
    """A copy of cfg with the given non-None demo fields (`kw`) replaced, then its `train` config's
    typed `settings` ({dotted key: value}) and `key=value` overrides (`-s`) applied."""
    out = replace(cfg, train=copy.deepcopy(cfg.train), **{k: v for k, v in kw.items() if v is not None})
    for key, value in (settings or {}).items():
        assign(out.train, key, value)
    apply_overrides(out.train, overrides or [])
    return out

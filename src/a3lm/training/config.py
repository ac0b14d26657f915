"""The training configuration: one dataclass per part, named presets, and how a run's config is built.

    make_config(model=..., preset="cpu", overrides=["optim.lr=3e-4"]) -> TrainConfig

A preset (default: "tiny" without a model, "base" with one), then --model / --data / --output, then
typed settings and `key=value` overrides (`a3lm.overrides`, read by each field's type).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from a3lm.data.config import SYNTHETIC, DataConfig
from a3lm.training.curriculum import CurriculumConfig
from a3lm.training.overrides import apply_overrides, assign


@dataclass
class ModelConfig:
    """path: a decoder (Llama, Qwen2, ...) or A3 checkpoint; None builds a tiny Llama from scratch."""

    path: str | None = None
    tokenizer: str | None = None  # default: `path`, or the synthetic word tokenizer
    family: str = "llama"  # the tiny model's architecture (no `path`)
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 64
    init_seed: int | None = None  # the tiny model's init; None: the run's `seed`
    gradient_checkpointing: bool = False


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine / linear decay to min_lr_ratio * lr.

    The schedule spans a phase (stage 0; stages 1-3), or with `stage_schedule` restarts (warmup, then
    decay) at every curriculum stage, so that stage 3 trains from the peak LR as it would alone.
    """

    lr: float = 1e-3  # stages 1-3
    stage0_lr: float = 3e-3  # plain AR pretraining from scratch
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 20
    decay: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1
    stage_schedule: bool = False  # warmup + decay per curriculum stage instead of one over stages 1-3
    grad_clip: float = 1.0  # 0 = off
    grad_accum: int = 1  # micro-batches per optimizer step


@dataclass
class CheckpointConfig:
    every: int = 200  # steps; a checkpoint is also written at the end of every phase and on SIGINT/SIGTERM
    keep: int = 2


@dataclass
class LoRAConfig:
    """LoRA adapters (peft) on the decoder's linear layers; the query vector trains in full, every other
    weight stays frozen. rank 0 = off (full fine-tuning). Stages 1-3 only: stage 0 pretrains in full."""

    rank: int = 0
    alpha: float | None = None  # the update is scaled by alpha / rank; None: 2 * rank (scale 2)
    dropout: float = 0.05  # on the adapters' input
    target_modules: list[str] = field(default_factory=list)  # module names; empty: every linear layer of
    # the decoder's blocks (attention and MLP projections), never the embeddings or the LM head
    load_in_4bit: bool = False  # QLoRA (4-bit base): refused in this version, see docs/training.md

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank

    def validate(self, stages: list[int]) -> None:
        if self.rank < 0:
            raise ValueError(f"lora.rank must be >= 0 (0 = off), got {self.rank}")
        if not self.enabled:
            if self.load_in_4bit:
                raise ValueError("lora.load_in_4bit quantizes the frozen base under LoRA: set lora.rank > 0")
            return
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if 0 in stages:
            raise ValueError(
                "lora adapts a pretrained decoder: drop stage 0 (plain AR pretraining trains "
                "every weight) from curriculum.stages, or set lora.rank=0"
            )


@dataclass
class LogConfig:
    every: int = 10
    progress: bool = True  # tqdm bar on rank 0
    wandb: bool = False
    tensorboard: bool = False
    project: str = "a3lm"


@dataclass
class TrainConfig:
    output: str = "runs/a3"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    precision: str = "auto"  # auto (bf16 autocast on GPUs that support it, else fp32) | bf16 | fp32
    parallel: str = (
        "ddp"  # with several processes: ddp (replicated) | fsdp (sharded, FSDP2 per decoder layer)
    )
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0  # the run's seed; also every sub-seed left unset (SUB_SEEDS)
    stop_after: int | None = None  # stop at this global step with a checkpoint (time-limited jobs)

    def seeded(self) -> TrainConfig:
        """A copy whose sub-seeds left unset (None) are `seed`: one setting reseeds the model init, the
        groupings and the synthetic corpus, while a sub-seed set explicitly (the demo's) stays."""
        cfg = copy.deepcopy(self)
        for section, key in SUB_SEEDS:
            part = getattr(cfg, section)
            if getattr(part, key) is None:
                setattr(part, key, cfg.seed)
        return cfg

    def validate(self) -> None:
        self.curriculum.validate()
        self.data.validate()
        self.lora.validate(self.curriculum.stages)
        o = self.optim
        if o.lr <= 0 or o.stage0_lr <= 0:
            raise ValueError("optim.lr and optim.stage0_lr must be > 0")
        if o.grad_accum < 1 or o.warmup_steps < 0:
            raise ValueError("optim.grad_accum must be >= 1 and optim.warmup_steps >= 0")
        if o.decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"optim.decay must be cosine, linear or constant, got {o.decay!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be ddp or fsdp, got {self.parallel!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.checkpoint.every < 1 or self.checkpoint.keep < 1:
            raise ValueError("checkpoint.every and checkpoint.keep must be >= 1")
        if self.model.path is None and self.data.source != SYNTHETIC and self.model.tokenizer is None:
            raise ValueError(
                "a model built from scratch (no --model) needs the synthetic data or model.tokenizer"
            )


# (section, field) of the seeds of one part of a run; None takes the run's `seed` (`TrainConfig.seeded`)
SUB_SEEDS = (
    ("model", "init_seed"),
    ("curriculum", "seed"),
    ("data", "synthetic_seed"),
    ("data", "mixture_seed"),
)
# fields that may change between a run and its resumption (they do not change what is computed)
RESUMABLE_FIELDS = ("output", "checkpoint", "log", "stop_after")
# how the rows of a step are split over processes and micro-batches: free to change on resume (e.g.
# with a new number of processes) as long as the rows per step stay those of the checkpoint
LAYOUT_FIELDS = (("data", "micro_batch_size"), ("optim", "grad_accum"))


def scaled(steps: int, scale: float) -> int:
    return max(1, round(steps * scale))


def cpu_preset(scale: float = 1.0) -> TrainConfig:
    """Adapt a ~100M-parameter pretrained decoder (SmolLM2-135M) on a 2-core CPU: about 16 minutes
    at scale 1 on a quiet machine (Gemma 3 270M, twice the parameters: about 35), on the real English
    of the "fortunes" corpus. Rows of 128 tokens, 4 per step (512 tokens); 240 optimizer steps (123k
    tokens), three-stage curriculum."""
    return TrainConfig(
        data=DataConfig(source="fortunes", seq_len=128, micro_batch_size=4),
        curriculum=CurriculumConfig(
            stages=[1, 2, 3],
            stage1_steps=scaled(20, scale),
            stage2_steps=scaled(60, scale),
            stage3_steps=scaled(160, scale),
            infill_share=0.1,
        ),
        optim=OptimConfig(lr=1e-4, warmup_steps=10, weight_decay=0.01),
        checkpoint=CheckpointConfig(every=20, keep=1),
        log=LogConfig(every=5),
        precision="fp32",
        device="cpu",
    )


def stage3_only(cfg: TrainConfig) -> TrainConfig:
    """The paper's ablation of `cfg`: stage 3 alone for as many steps as `cfg`'s whole curriculum."""
    cur = dataclasses.replace(cfg.curriculum, stages=[3], stage3_steps=cfg.curriculum.total_steps)
    return dataclasses.replace(cfg, curriculum=cur)


@dataclass(frozen=True)
class PaperModel:
    """A decoder of the paper's recipe: its Hub id, parameter count (for the FLOPs estimate) and the
    per-GPU micro-batch that fits an 80 GB GPU at 2048 tokens with activation checkpointing."""

    key: str
    hub_id: str
    params: float
    micro_batch: int


PAPER_MODELS = (
    PaperModel("llama-3.2-1b", "meta-llama/Llama-3.2-1B", 1.24e9, 8),
    PaperModel("llama-3.2-3b", "meta-llama/Llama-3.2-3B", 3.21e9, 4),
    PaperModel("llama-3.1-8b", "meta-llama/Llama-3.1-8B", 8.03e9, 2),
    PaperModel("qwen3-0.6b", "Qwen/Qwen3-0.6B", 0.60e9, 8),
    PaperModel("qwen3-1.7b", "Qwen/Qwen3-1.7B", 1.72e9, 8),
)
PAPER_MIXTURE = "HuggingFaceFW/fineweb@sample-10BT:0.7,cerebras/SlimPajama-627B:0.3"  # weights: a3lm's choice
PAPER_TOKENS = 8_000_000_000  # the paper's adaptation budget; its curriculum ablation used 2B
ABLATION_TOKENS = 2_000_000_000
PAPER_SEQ_LEN = 2048
PAPER_ROWS_PER_STEP = 128  # rows of PAPER_SEQ_LEN per optimizer step, over all GPUs (262k tokens)
PAPER_GPUS = 8  # full fine-tuning: FSDP2 over one node of 8 GPUs; LoRA: one GPU
STAGE_SHARES = (1 / 12, 3 / 12, 8 / 12)  # stages 1, 2, 3: the cpu preset's 20 : 60 : 160


def paper_preset(model: PaperModel, tokens: int, lora: bool = False) -> TrainConfig:
    """The recipe for `model` at a budget of `tokens`: stages 1-3 over the FineWeb + SlimPajama
    mixture, 2048-token rows, 128 rows per step, cosine LR with 1% warmup. Full fine-tuning shards
    over PAPER_GPUS GPUs (FSDP2, activation checkpointing, bf16); `lora` trains rank-64 adapters on one
    GPU (gradient accumulation makes up the same 128 rows)."""
    gpus = 1 if lora else PAPER_GPUS
    accum = PAPER_ROWS_PER_STEP // (model.micro_batch * gpus)
    steps = round(tokens / (PAPER_ROWS_PER_STEP * PAPER_SEQ_LEN))
    s1, s2 = (round(steps * share) for share in STAGE_SHARES[:2])
    return TrainConfig(
        output=f"runs/{model.key}{'-lora' if lora else ''}",
        model=ModelConfig(path=model.hub_id, gradient_checkpointing=True),
        data=DataConfig(source=PAPER_MIXTURE, seq_len=PAPER_SEQ_LEN, micro_batch_size=model.micro_batch),
        curriculum=CurriculumConfig(
            stages=[1, 2, 3], stage1_steps=s1, stage2_steps=s2, stage3_steps=steps - s1 - s2, infill_share=0.1
        ),
        optim=OptimConfig(
            lr=2e-4 if lora else 2e-5,
            warmup_steps=max(1, steps // 100),
            grad_accum=accum,
            weight_decay=0.0 if lora else 0.1,
            decay="cosine",
            min_lr_ratio=0.1,
        ),
        lora=LoRAConfig(rank=64, dropout=0.05) if lora else LoRAConfig(),
        checkpoint=CheckpointConfig(every=500, keep=3),
        log=LogConfig(every=10),
        precision="bf16",
        parallel="ddp" if lora else "fsdp",
        device="cuda",
    )


# GPU-hour estimate (docs/training.md): 6 N FLOPs per token trained in full (forward 2N, backward 4N),
# 4 N under LoRA (the frozen weights get no weight gradient), times the A3 / AR step-time ratio,
# over an H100's dense bf16 peak at an assumed model-FLOPs utilisation.
A3_STEP_RATIO = 1.7  # A3 step / AR step, measured (bench/bench_model.py, README "Benchmarks": 1.69x)
GPU_PEAK_FLOPS = 989e12  # H100 SXM, dense bf16
ASSUMED_MFU = 0.4


def gpu_hours(model: PaperModel, cfg: TrainConfig) -> float:
    """Estimated GPU-hours of a paper preset (all GPUs together); assumptions above."""
    tokens = cfg.curriculum.total_steps * PAPER_ROWS_PER_STEP * cfg.data.seq_len
    flops_per_token = (4 if cfg.lora.enabled else 6) * model.params * A3_STEP_RATIO
    return tokens * flops_per_token / (GPU_PEAK_FLOPS * ASSUMED_MFU) / 3600


def paper_presets() -> dict[str, TrainConfig]:
    """Per model: the 8B-token recipe (`<key>`), the 2B-token curriculum ablation (`<key>-2b`) and its
    stage-3-only control (`<key>-2b-stage3-only`), and the one-GPU LoRA recipe (`<key>-lora`)."""
    table = {}
    for m in PAPER_MODELS:
        two = paper_preset(m, ABLATION_TOKENS)
        table |= {
            m.key: paper_preset(m, PAPER_TOKENS),
            f"{m.key}-2b": two,
            f"{m.key}-2b-stage3-only": stage3_only(two),
            f"{m.key}-lora": paper_preset(m, PAPER_TOKENS, True),
        }
    return table


def preset_gpus(cfg: TrainConfig) -> int:
    """The number of processes a paper preset is laid out for (its rows per step assume it)."""
    return 1 if cfg.lora.enabled else PAPER_GPUS


def presets(scale: float = 1.0) -> dict[str, TrainConfig]:
    """Named starting points; the CLI's `--preset`, then `--set key=value` overrides.

    `scale` multiplies the step counts of the CPU presets (the budget knob); "cpu-stage3-only" has
    exactly as many steps as "cpu" at every scale.
    """
    tiny = TrainConfig(
        curriculum=CurriculumConfig(
            stages=[0, 1, 2, 3],
            stage0_steps=400,
            stage1_steps=100,
            stage2_steps=300,
            stage3_steps=800,
            infill_share=0.1,
        ),
    )
    base = TrainConfig(
        data=DataConfig(source="HuggingFaceFW/fineweb", name="sample-10BT", seq_len=2048, micro_batch_size=4),
        curriculum=CurriculumConfig(
            stages=[1, 2, 3], stage1_steps=500, stage2_steps=2000, stage3_steps=10000, infill_share=0.1
        ),
        optim=OptimConfig(lr=2e-5, warmup_steps=200, grad_accum=8, weight_decay=0.1),
        checkpoint=CheckpointConfig(every=500, keep=3),
        log=LogConfig(every=10),
    )
    # the ablations train stage 3 alone for as many steps as stages 1-3 together (stage 0 kept)
    tiny_cur = tiny.curriculum
    tiny_ablation = dataclasses.replace(
        tiny,
        curriculum=dataclasses.replace(
            tiny_cur,
            stages=[0, 3],
            stage3_steps=tiny_cur.stage1_steps + tiny_cur.stage2_steps + tiny_cur.stage3_steps,
        ),
    )
    cpu = cpu_preset(scale)
    return {
        "tiny": tiny,
        "base": base,
        "stage3-only": stage3_only(base),
        "tiny-stage3-only": tiny_ablation,
        "cpu": cpu,
        "cpu-stage3-only": stage3_only(cpu),
        **paper_presets(),
    }


def make_config(
    model: str | None = None,
    data: str | None = None,
    output: str | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
    scale: float = 1.0,
    settings: dict[str, Any] | None = None,
) -> TrainConfig:
    """A preset, then model/data/output, then `settings` ({dotted key: typed value}), then overrides.

    scale: multiplies the CPU presets' step counts (other presets take overrides).
    """
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    table = presets(scale)
    name = preset or ("tiny" if model is None else "base")
    if name not in table:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(table)}")
    if scale != 1.0 and not name.startswith("cpu"):
        raise ValueError(
            f"--scale multiplies the cpu presets' steps, not {name!r}'s: "
            "set its steps with -s curriculum.stageK_steps=N"
        )
    cfg = table[name]
    if model is not None:
        cfg.model.path = model
    if data is not None:
        cfg.data.source = data
    if output is not None:
        cfg.output = output
    for key, value in (settings or {}).items():
        assign(cfg, key, value)
    apply_overrides(cfg, overrides or [])
    cfg.validate()
    return cfg


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "curriculum": CurriculumConfig,
    "optim": OptimConfig,
    "lora": LoRAConfig,
    "checkpoint": CheckpointConfig,
    "log": LogConfig,
}


def config_from_dict(d: dict) -> TrainConfig:
    """The inverse of `dataclasses.asdict` (TypeError for a key this version does not know)."""
    return TrainConfig(**{k: SECTIONS[k](**v) if k in SECTIONS else v for k, v in d.items()})

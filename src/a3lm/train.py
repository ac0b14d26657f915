"""Training: the curriculum on a Hugging Face decoder, data-parallel, resumable bit for bit.

    train(TrainConfig(...)) -> Path of run/final

The run folder:

    config.json         the TrainConfig (a rerun with a different config is refused)
    metrics.jsonl       one line per logged step
    checkpoints/step_N  meta.json (step, phase), state/ (model, optimizer, LR schedule through
                        torch.distributed.checkpoint: sharded under FSDP), data_rank*.pt and
                        rng_rank*.pt per process; atomic, the last `checkpoint.keep` kept
    ar_final/           stage 0 only: the plain AR model after pretraining (+ tokenizer)
    final/              the A3 model (+ tokenizer), `save_pretrained`

Phases: stage 0 trains the base `*ForCausalLM` itself with its next-token loss; stages 1-3 train the
A3 model built from it (`A3ForCausalLM.from_base`) with a fresh optimizer and LR schedule, since
pretraining and curriculum fine-tuning want different learning rates. Steps are global across
phases, so `step` alone locates a run; the curriculum decides the grouping of every step.

Distributed: under `torchrun` or `accelerate launch` (RANK / WORLD_SIZE / LOCAL_RANK in the
environment) it trains data-parallel with torch DDP (NCCL on GPUs, gloo on CPU), unchanged, or with
FSDP2 (`parallel="fsdp"`). Each stateful part (model, optimizer, schedule, data position, RNG)
registers with one `checkpoint.CheckpointManager`; a checkpoint resumes on any number of processes
as long as the rows per step (micro_batch_size x grad_accum x processes) stay the same.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from .curriculum import CurriculumConfig, GroupPolicy, describe, draw_group_ids, policy_at, rank_generator
from .data import SYNTHETIC, DataConfig, PackedLoader, build_loader, resolve_local_files
from .model import A3ForCausalLM, check_model_path

AR_DIR = "ar_final"
FINAL_DIR = "final"
CHECKPOINTS_DIR = "checkpoints"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"


# -- configuration -------------------------------------------------------------------------------


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
    init_seed: int = 0
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
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    precision: str = "auto"  # auto (bf16 autocast on GPUs that support it, else fp32) | bf16 | fp32
    parallel: str = "ddp"  # with several processes: ddp (replicated) | fsdp (sharded, FSDP2 per decoder layer)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    stop_after: int | None = None  # stop at this global step with a checkpoint (time-limited jobs)

    def validate(self) -> None:
        self.curriculum.validate()
        self.data.validate()
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
            raise ValueError("a model built from scratch (no --model) needs the synthetic data or model.tokenizer")


# fields that may change between a run and its resumption (they do not change what is computed)
RESUMABLE_FIELDS = ("output", "checkpoint", "log", "stop_after")
# how the rows of a step are split over processes and micro-batches: free to change on resume (e.g.
# with a new number of processes) as long as the rows per step stay those of the checkpoint
LAYOUT_FIELDS = (("data", "micro_batch_size"), ("optim", "grad_accum"))


def scaled(steps: int, scale: float) -> int:
    return max(1, round(steps * scale))


def cpu_preset(scale: float = 1.0) -> TrainConfig:
    """Adapt a ~100M-parameter pretrained decoder (SmolLM2-135M) on a 2-core CPU: about 30 minutes
    at scale 1 on a quiet machine, on the real English of the "fortunes" corpus. Rows of 128 tokens,
    4 per step (512 tokens); 240 optimizer steps (123k tokens), three-stage curriculum."""
    return TrainConfig(
        data=DataConfig(source="fortunes", seq_len=128, micro_batch_size=4),
        curriculum=CurriculumConfig(stages=[1, 2, 3], stage1_steps=scaled(20, scale), stage2_steps=scaled(60, scale),
                                    stage3_steps=scaled(160, scale), infill_share=0.1),
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


def presets(scale: float = 1.0) -> dict[str, TrainConfig]:
    """Named starting points; the CLI's `--preset`, then `--set key=value` overrides.

    `scale` multiplies the step counts of the CPU presets (the budget knob); "cpu-stage3-only" has
    exactly as many steps as "cpu" at every scale.
    """
    tiny = TrainConfig(
        curriculum=CurriculumConfig(stages=[0, 1, 2, 3], stage0_steps=400, stage1_steps=100, stage2_steps=300,
                                    stage3_steps=800, infill_share=0.1),
    )
    base = TrainConfig(
        data=DataConfig(source="HuggingFaceFW/fineweb", name="sample-10BT", seq_len=2048, micro_batch_size=4),
        curriculum=CurriculumConfig(stages=[1, 2, 3], stage1_steps=500, stage2_steps=2000, stage3_steps=10000,
                                    infill_share=0.1),
        optim=OptimConfig(lr=2e-5, warmup_steps=200, grad_accum=8, weight_decay=0.1),
        checkpoint=CheckpointConfig(every=500, keep=3),
        log=LogConfig(every=10),
    )
    # the ablations train stage 3 alone for as many steps as stages 1-3 together (stage 0 kept)
    tiny_cur = tiny.curriculum
    tiny_ablation = dataclasses.replace(tiny, curriculum=dataclasses.replace(
        tiny_cur, stages=[0, 3], stage3_steps=tiny_cur.stage1_steps + tiny_cur.stage2_steps + tiny_cur.stage3_steps))
    cpu = cpu_preset(scale)
    return {"tiny": tiny, "base": base, "stage3-only": stage3_only(base), "tiny-stage3-only": tiny_ablation,
            "cpu": cpu, "cpu-stage3-only": stage3_only(cpu)}


def _parse_value(text: str, current: Any) -> Any:
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected a boolean, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, list):
        return json.loads(text) if text.startswith("[") else [int(t) for t in text.split(",") if t]
    if text.lower() in ("none", "null"):
        return None
    try:  # None-valued fields (int | None, str | None): a number if it reads as one
        return int(text)
    except ValueError:
        return text


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Set `section.key=value` (or top-level `key=value`) fields in place; unknown keys are errors."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value, e.g. optim.lr=3e-4")
        key, text = item.split("=", 1)
        *path, name = key.strip().split(".")
        obj: Any = cfg
        for part in path:
            if not dataclasses.is_dataclass(obj) or not hasattr(obj, part):
                raise ValueError(f"unknown config section {key!r}; sections: {[f.name for f in dataclasses.fields(cfg)]}")
            obj = getattr(obj, part)
        names = [f.name for f in dataclasses.fields(obj)]
        if name not in names:
            raise ValueError(f"unknown config key {key!r}; valid keys here: {names}")
        try:
            setattr(obj, name, _parse_value(text, getattr(obj, name)))
        except ValueError as e:
            raise ValueError(f"bad value for {key}: {e}") from e
    return cfg


def make_config(
    model: str | None = None,
    data: str | None = None,
    output: str | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
    scale: float = 1.0,
) -> TrainConfig:
    """A preset (default: "tiny" without a model, "base" with one), then model/data/output, then overrides.

    scale: multiplies the CPU presets' step counts (other presets take `--set` overrides).
    """
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    table = presets(scale)
    name = preset or ("tiny" if model is None else "base")
    if name not in table:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(table)}")
    cfg = table[name]
    if model is not None:
        cfg.model.path = model
    if data is not None:
        cfg.data.source = data
    if output is not None:
        cfg.output = output
    apply_overrides(cfg, overrides or [])
    cfg.validate()
    return cfg


def config_from_dict(d: dict) -> TrainConfig:
    sections = {"model": ModelConfig, "data": DataConfig, "curriculum": CurriculumConfig, "optim": OptimConfig,
                "checkpoint": CheckpointConfig, "log": LogConfig}
    return TrainConfig(**{k: sections[k](**v) if k in sections else v for k, v in d.items()})


def _comparable(d: dict) -> dict:
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items() if k not in RESUMABLE_FIELDS}
    for section, key in LAYOUT_FIELDS:
        d.get(section, {}).pop(key, None)
    return d


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [x for k in sorted(set(a) | set(b)) for x in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} (saved) vs {b!r} (now)"]


def check_run_folder(out: Path, cfg: TrainConfig, write: bool) -> None:
    """Refuse an output folder holding a different run; record the config in a new one."""
    path = out / CONFIG_FILE
    mine = asdict(cfg)
    if path.exists():
        saved = json.loads(path.read_text())
        # Fields added since that run was written take their defaults; a key this version does not
        # know leaves the saved dict as written, and the diff names it.
        with suppress(TypeError):
            saved = asdict(config_from_dict(saved))
        diffs = _diff(_comparable(saved), _comparable(mine))
        if diffs:
            raise ValueError(
                f"output folder {out} holds a different run (config differs in: {'; '.join(diffs)}). "
                "Choose another --output, or delete the folder to start over"
            )
    elif out.exists() and any(p.name != CONFIG_FILE for p in out.iterdir()):
        raise ValueError(f"output folder {out} is not empty and holds no a3lm run ({CONFIG_FILE} missing)")
    if write:  # the latest layout (micro-batch size, accumulation) is what a rerun compares with
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{CONFIG_FILE}.tmp"
        tmp.write_text(json.dumps(mine, indent=2) + "\n")
        os.replace(tmp, path)


# -- parts: distributed, model, optimizer, schedule ------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device_type: str) -> Dist:
    """Join the process group that torchrun / accelerate launch describe in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(cfg: TrainConfig, d: Dist) -> torch.device:
    kind = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device(kind)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.precision == "fp32":
        return None
    if cfg.precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def load_tokenizer(cfg: TrainConfig):
    if cfg.model.tokenizer or cfg.model.path:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
    from .synthetic import default_hmm
    from .tokenizer import word_tokenizer

    return word_tokenizer(default_hmm(cfg.data.hmm_seed).words, model_max_length=cfg.model.max_position_embeddings)


def initial_base_model(cfg: TrainConfig, vocab_size: int) -> nn.Module:
    """The plain `*ForCausalLM` a run starts from: loaded from model.path or a fresh tiny one."""
    if cfg.model.path is not None:
        from safetensors import SafetensorError
        from transformers import AutoConfig, AutoModelForCausalLM

        if getattr(AutoConfig.from_pretrained(cfg.model.path), "model_type", None) == "a3":
            raise ValueError(f"{cfg.model.path} is already an A3 model: stage 0 (plain AR) needs a base decoder")
        try:
            return AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
        except SafetensorError as err:
            raise OSError(f"corrupt checkpoint in {cfg.model.path}: {err}") from err
    from .debug import tiny_base_model

    m = cfg.model
    return tiny_base_model(m.family, seed=m.init_seed, vocab_size=vocab_size, hidden_size=m.hidden_size,
                           num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
                           num_key_value_heads=m.num_key_value_heads, max_position_embeddings=m.max_position_embeddings)


def initial_a3_model(cfg: TrainConfig, vocab_size: int) -> A3ForCausalLM:
    if cfg.model.path is not None:
        return A3ForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    return A3ForCausalLM.from_base(initial_base_model(cfg, vocab_size))


def max_positions(model: nn.Module) -> int | None:
    config = getattr(model.config, "text_config", None) or model.config
    return getattr(config, "max_position_embeddings", None)


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms, biases and the query vector (1-D parameters), as is usual."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak LR at phase-local step `step` of `total`: warmup, then decay."""
    warmup = min(cfg.warmup_steps, max(total - 1, 0))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.decay == "constant" or total <= warmup + 1:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup - 1))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.decay == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


class Schedule:
    """LambdaLR-like: a stateful step counter setting the optimizer's LRs (state_dict is picklable).

    `segments` (default: one of `total` steps) are consecutive stretches that each run their own
    warmup and decay (`OptimConfig.stage_schedule`: one per curriculum stage).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, peak_lr: float, total: int, cfg: OptimConfig,
                 segments: list[int] | None = None):
        self.optimizer, self.peak_lr, self.total, self.cfg, self.step_count = optimizer, peak_lr, total, cfg, 0
        self.segments = segments or [total]
        if sum(self.segments) != total:
            raise ValueError(f"schedule segments {self.segments} do not add up to the phase's {total} steps")
        self._apply()

    def lr(self) -> float:
        step = self.step_count
        for length in self.segments[:-1]:
            if step < length:
                break
            step -= length
        else:
            length = self.segments[-1]
        return self.peak_lr * lr_factor(step, length, self.cfg)

    def _apply(self) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr()

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "peak_lr": self.peak_lr, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.step_count, self.peak_lr, self.total = state["step_count"], state["peak_lr"], state["total"]
        self._apply()


@contextmanager
def _quiet_hf() -> Iterator[None]:
    """No "Writing model shards" bar in the middle of our own progress bar."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


# -- RNG state ----------------------------------------------------------------------------------------


def rng_state(group_gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
             "groups": group_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, group_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    group_gen.set_state(state["groups"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- stateful parts, registered with the checkpoint manager ----------------------------------------


class ModelState:
    """The model's weights keyed by parameter name: DTensor shards under FSDP, whole tensors otherwise."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, state)


class OptimizerState:
    """AdamW's moments keyed by parameter name (not by position), so they reshard with the model."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(flatten_optimizer_state_dict=True)

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer, options=self._options())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state, options=self._options())


class DataPosition:
    """This rank's data position; on another world size, the position of every old rank (see data.py)."""

    def __init__(self, loader: PackedLoader):
        self.loader = loader

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)

    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        self.loader.load_resharded(states)


class RNGState:
    """The global RNGs and this rank's grouping stream.

    On another world size, the global RNGs (the same on every rank: they drive the model init) come
    from old rank 0, and each rank's grouping stream is drawn afresh from (seed, rank, step): stage 3's
    groupings then differ from the uninterrupted run's (the same distribution, other draws).
    """

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        return rng_state(self.trainer.group_gen)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state, self.trainer.group_gen)

    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        t = self.trainer
        set_rng_state(states[0], t.group_gen)
        t.group_gen = rank_generator(t.cfg.curriculum.seed, t.dist.rank, salt=(t.dist.world_size, t.step))


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) was NaN/inf: the step was not taken."""


# -- the trainer --------------------------------------------------------------------------------------


@dataclass
class Phase:
    """A stretch of steps trained on one model kind with one optimizer and LR schedule."""

    kind: str  # "ar" (stage 0, the base model) | "a3" (stages 1-3)
    start: int
    end: int


def phases(cur: CurriculumConfig) -> list[Phase]:
    out: list[Phase] = []
    for stage, start, end in cur.spans():
        kind = "ar" if stage == 0 else "a3"
        if out and out[-1].kind == kind:
            out[-1].end = end
        else:
            out.append(Phase(kind, start, end))
    return out


class Trainer:
    """Owns the model, optimizer, data and RNG of one rank; `fit()` runs the curriculum to its end."""

    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.output)
        device_type = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.dist = init_distributed(device_type)
        self.device = pick_device(cfg, self.dist)
        self.amp_dtype = autocast_dtype(cfg, self.device)
        # read-only checks first: nothing is written until the model and the data are known to load
        check_run_folder(self.out, cfg, write=False)
        if cfg.model.path is not None:
            check_model_path(cfg.model.path)
        if cfg.model.tokenizer is not None:
            check_model_path(cfg.model.tokenizer, "tokenizer")
        if cfg.data.source != SYNTHETIC:
            resolve_local_files(cfg.data.source)  # a missing local file fails now, not after loading the model
        self.ckpt_root = self.out / CHECKPOINTS_DIR
        self.phases = phases(cfg.curriculum)
        self.total_steps = cfg.curriculum.total_steps
        self.tokenizer = load_tokenizer(cfg)

        # Seeds first: the tiny model's init and the query vector draw from the global RNG.
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.group_gen = rank_generator(cfg.curriculum.seed, self.dist.rank)
        self.step, self.tokens_seen = 0, 0
        self.stop_requested = False
        self.model: nn.Module | None = None
        self.ddp_model: nn.Module | None = None
        self.phase: Phase | None = None
        self._metrics_file = None
        self._backends: list[Any] = []
        self._closers: list[Any] = []

        # every part with a state registers here; checkpoints save and restore through it
        self.checkpoints = ckpt.CheckpointManager(self.ckpt_root, cfg.checkpoint.keep, self.dist.rank,
                                                  self.dist.world_size, self.dist.barrier)
        latest = self.checkpoints.latest()
        if latest is not None:
            self._enter_phase(*self._resume_skeleton(latest))
        else:
            first = self.phases[0]
            model = initial_base_model(cfg, len(self.tokenizer)) if first.kind == "ar" else \
                initial_a3_model(cfg, len(self.tokenizer))
            self._enter_phase(first, model)
        self.loader = self._build_loader()
        self.loader.check_readable()
        self.checkpoints.register("data", DataPosition(self.loader), per_rank=True)
        self.checkpoints.register("rng", RNGState(self), per_rank=True)
        if latest is not None:
            self.checkpoints.load(latest)
            if self.dist.main:
                self._truncate_metrics()
        self.new_run = not (self.out / CONFIG_FILE).exists()
        self.dist.barrier()  # every rank looks before rank 0 writes
        if self.dist.main:
            check_run_folder(self.out, cfg, write=True)
        self.dist.barrier()

    # -- setup ----------------------------------------------------------------------------------

    def _build_loader(self) -> PackedLoader:
        return build_loader(self.cfg.data, self.tokenizer, self.dist.rank, self.dist.world_size,
                            max_positions=max_positions(self.model))

    def phase_at(self, step: int) -> Phase:
        return next(p for p in self.phases if p.start <= step < p.end)

    def _enter_phase(self, phase: Phase, model: nn.Module) -> None:
        """Put `model` (already the phase's kind) on the device with a fresh optimizer and schedule."""
        self.phase = phase
        model.train().to(self.device)
        if self.cfg.model.gradient_checkpointing:
            kwargs = {"use_reentrant": False}  # reentrant checkpointing breaks DDP's gradient hooks
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.model = model
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            # one FSDP unit per decoder layer (gathered just in time), the rest (embeddings, head,
            # query vector) in the root unit
            layer_types = set(getattr(model, "_no_split_modules", None) or [])
            for module in model.modules():
                if type(module).__name__ in layer_types:
                    fully_shard(module)
            fully_shard(model)
            self.ddp_model = model
        elif self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DDP(model, device_ids=ids)
        else:
            self.ddp_model = model
        lr = self.cfg.optim.stage0_lr if phase.kind == "ar" else self.cfg.optim.lr
        self.optimizer = build_optimizer(model, self.cfg.optim, lr)
        segments = None
        if self.cfg.optim.stage_schedule:
            segments = [e - b for _, b, e in self.cfg.curriculum.spans() if phase.start <= b < phase.end]
        self.schedule = Schedule(self.optimizer, lr, phase.end - phase.start, self.cfg.optim, segments)
        self.checkpoints.register("model", ModelState(model))
        self.checkpoints.register("optimizer", OptimizerState(model, self.optimizer))
        self.checkpoints.register("schedule", self.schedule)

    def _next_phase(self) -> None:
        """Stage 0 -> 1: wrap the AR model as an A3 model (fresh query vector), new optimizer."""
        phase = self.phase_at(self.step)
        base = self.model
        if phase.kind == "a3" and self.phase.kind == "ar":
            if self.fsdp:  # gather the shards into a plain CPU copy of the base model
                from transformers import AutoModelForCausalLM

                state = self._full_state_dict(all_ranks=True)
                with torch.random.fork_rng(devices=[]):  # its throwaway init must not move the RNG
                    base = AutoModelForCausalLM.from_config(base.config)
                base.load_state_dict(state)
            model = A3ForCausalLM.from_base(base.eval().cpu())
        else:
            raise RuntimeError(f"no transition from a {self.phase.kind} phase to a {phase.kind} phase")
        self._enter_phase(phase, model)

    @property
    def fsdp(self) -> bool:
        return self.dist.enabled and self.cfg.parallel == "fsdp"

    def _full_state_dict(self, all_ranks: bool = False) -> dict[str, torch.Tensor] | None:
        """FSDP: the gathered weights (a collective: every rank calls it), on rank 0 only unless
        all_ranks. Otherwise None: the module's own state_dict is already whole."""
        if not self.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=not all_ranks))

    def _save_pretrained(self, folder: Path, state_dict: dict | None = None, tokenizer: bool = True) -> None:
        with _quiet_hf():
            self.model.save_pretrained(folder, state_dict=state_dict)
        if tokenizer:
            self.tokenizer.save_pretrained(folder)

    def _save_model_dir(self, name: str) -> None:
        """run/<name> = model + tokenizer, atomically; every rank calls it (FSDP gathers)."""
        state = self._full_state_dict()
        if self.dist.main:
            ckpt.atomic_dir(self.out / name, lambda folder: self._save_pretrained(folder, state))
        self.dist.barrier()

    # -- checkpoints ----------------------------------------------------------------------------

    def rows_per_step(self) -> int:
        return self.cfg.data.micro_batch_size * self.cfg.optim.grad_accum * self.dist.world_size

    def save_checkpoint(self) -> Path:
        """Every registered part (sharded under FSDP), plus what a resume must know before building."""
        meta = {"step": self.step, "tokens_seen": self.tokens_seen, "phase": self.phase.kind,
                "rows_per_step": self.rows_per_step(), "model_config": self.model.config.to_dict(),
                "policy": asdict(policy_at(self.cfg.curriculum, max(self.step - 1, 0)))}
        return self.checkpoints.save(self.step, meta)

    def _resume_skeleton(self, path: Path) -> tuple[Phase, nn.Module]:
        """The phase of checkpoint `path` and a model of its architecture (weights loaded later)."""
        try:
            meta = ckpt.read_meta(path)
        except FileNotFoundError as e:
            raise ValueError(f"checkpoint {path} has no {ckpt.META_FILE}: it was written by an older a3lm; "
                             "start a new --output") from e
        if meta["rows_per_step"] != self.rows_per_step():
            raise ValueError(
                f"checkpoint {path} was trained with {meta['rows_per_step']} rows per step; this run has "
                f"data.micro_batch_size {self.cfg.data.micro_batch_size} x optim.grad_accum "
                f"{self.cfg.optim.grad_accum} x {self.dist.world_size} processes = {self.rows_per_step()}: "
                "change data.micro_batch_size or optim.grad_accum so the product matches"
            )
        self.step, self.tokens_seen = meta["step"], meta["tokens_seen"]
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(**meta["model_config"])
        with torch.random.fork_rng(devices=[]), _quiet_hf():  # a throwaway init: the weights are loaded next
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # the phase the saved model belongs to (the step may sit exactly at its end)
        phase = next(p for p in self.phases if p.kind == meta["phase"] and p.start < self.step <= p.end)
        return phase, model

    # -- logging --------------------------------------------------------------------------------

    def _truncate_metrics(self) -> None:
        """Drop lines logged after the checkpoint we resume from: they will be logged again."""
        path = self.out / METRICS_FILE
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
            path.write_text("".join(ln + "\n" for ln in lines))

    def _open_logs(self) -> None:
        if not self.dist.main:
            return
        self._metrics_file = open(self.out / METRICS_FILE, "a")  # noqa: SIM115 (closed in fit)
        if self.cfg.log.wandb:
            import wandb  # only when asked for

            run = wandb.init(project=self.cfg.log.project, config=asdict(self.cfg), dir=str(self.out),
                             id=self.out.resolve().name, resume="allow")
            self._backends.append(lambda m: run.log(m, step=m["step"]))
            self._closers.append(run.finish)
        if self.cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # only when asked for

            writer = SummaryWriter(str(self.out / "tensorboard"))
            self._backends.append(lambda m: [writer.add_scalar(k, v, m["step"]) for k, v in m.items()
                                             if isinstance(v, int | float) and k != "step"])
            self._closers.append(writer.close)

    def _log(self, metrics: dict) -> None:
        if self._metrics_file is not None:
            self._metrics_file.write(json.dumps(metrics) + "\n")
            self._metrics_file.flush()
        for backend in self._backends:
            backend(metrics)

    # -- one optimizer step ---------------------------------------------------------------------

    def _micro_loss(self, batch: dict[str, torch.Tensor], policy: GroupPolicy) -> tuple[torch.Tensor, int]:
        """(mean loss over the micro-batch's targets, number of targets)."""
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        amp = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        if policy.order == "ar":
            with amp:
                logits = self.ddp_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            # next-token loss in fp32 (HF's label shift): rows are packed, every position is real
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            return loss, ids[:, 1:].numel()
        group_ids = draw_group_ids(policy, batch["attention_mask"], self.group_gen).to(self.device)
        with amp:
            out = self.ddp_model(input_ids=ids, group_ids=group_ids, attention_mask=mask, labels=ids)
        return out.loss, int(out.num_targets)

    def _all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.dist.enabled:
            dist.all_reduce(t, op=op)
        return t

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches, loss weighted per target token globally."""
        policy = policy_at(self.cfg.curriculum, self.step)
        accum = self.cfg.optim.grad_accum
        batches = [self.loader.next_batch() for _ in range(accum)]
        # Rows are packed (no padding) and every grouping puts BOS alone first, so each row has
        # seq_len - 1 targets under both objectives: known before the forward, for exact weighting.
        counts = [b["input_ids"][:, 1:].numel() for b in batches]
        total = self._all_reduce(torch.tensor(float(sum(counts)), device=self.device))
        loss_sum = torch.zeros((), device=self.device)
        for i, (batch, n) in enumerate(zip(batches, counts, strict=True)):
            last = i == accum - 1
            sync = nullcontext()
            if self.fsdp:  # reduce-scatter the gradients once, after the last micro-batch
                self.model.set_requires_gradient_sync(last)
            elif self.dist.enabled and not last:
                sync = self.ddp_model.no_sync()
            with sync:
                loss, n_targets = self._micro_loss(batch, policy)
                if n_targets != n:
                    raise RuntimeError(f"expected {n} targets in micro-batch, the model counted {n_targets}")
                finite = self._all_reduce(torch.isfinite(loss.detach()).float(), dist.ReduceOp.MIN)
                if not bool(finite):
                    self.optimizer.zero_grad(set_to_none=True)
                    raise NonFiniteLossError(
                        f"non-finite loss ({float(loss.detach()):.4g} on rank {self.dist.rank}) at step {self.step} "
                        f"({describe(policy)}): the optimizer did not step, so the weights are those after step "
                        f"{self.step - 1}; the last checkpoint is intact. Lower optim.lr or use precision=fp32"
                    )
                # DDP averages gradients over ranks: scale so the result is the global per-token mean
                (loss * (n * self.dist.world_size / total)).backward()
            loss_sum += loss.detach() * n
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        )
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"non-finite gradient norm at step {self.step} ({describe(policy)}): the optimizer "
                                     "did not step. Lower optim.lr or use precision=fp32")
        lr = self.schedule.lr()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        tokens = sum(b["input_ids"].numel() for b in batches) * self.dist.world_size
        self.step += 1
        self.tokens_seen += tokens
        loss = float(self._all_reduce(loss_sum) / total)
        return {"step": self.step, "stage": policy.stage, "group_size": policy.size, "order": policy.order,
                "loss": loss, "lr": lr, "grad_norm": float(grad_norm), "tokens": self.tokens_seen, "step_tokens": tokens}

    # -- the loop -------------------------------------------------------------------------------

    @contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM ask for a checkpoint at the end of the current step; a second one kills."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, _frame):
            self.stop_requested = True
            signal.signal(signum, previous[signum])  # a second signal takes the default path

        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _should_stop(self) -> bool:
        flag = torch.tensor(float(self.stop_requested), device=self.device)
        return bool(self._all_reduce(flag, dist.ReduceOp.MAX))

    def fit(self) -> Path:
        """Train to the end of the curriculum (or `stop_after`); returns run/final (or the checkpoint)."""
        final = self.out / FINAL_DIR
        if self.step >= self.total_steps:
            self.dist.barrier()  # every rank looks before any rank writes
            if not final.exists():
                self._save_final()
            return final
        if self.cfg.stop_after is not None and self.step >= self.cfg.stop_after:
            return ckpt.latest_checkpoint(self.ckpt_root)
        self._open_logs()
        bar = None
        if self.dist.main and self.cfg.log.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True)
        try:
            with self._signals():
                while self.step < self.total_steps:
                    if self.step >= self.phase.end:
                        self._next_phase()
                    t0 = time.perf_counter()
                    m = self.train_step()
                    m["tokens_per_s"] = m.pop("step_tokens") / max(time.perf_counter() - t0, 1e-9)
                    if bar is not None:
                        bar.update(1)
                        bar.set_description(describe(policy_at(self.cfg.curriculum, self.step - 1)))
                        bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_s']:.0f}")
                    if self.step % self.cfg.log.every == 0 or self.step == self.total_steps:
                        self._log(m)
                    stop = self._should_stop()
                    at_stop = self.cfg.stop_after is not None and self.step >= self.cfg.stop_after
                    if self.step == self.phase.end and self.phase.kind == "ar":
                        self._save_ar_model()  # before the checkpoint: a checkpoint past stage 0 implies it
                    if (self.step % self.cfg.checkpoint.every == 0 or self.step == self.phase.end or stop or at_stop):
                        path = self.save_checkpoint()
                    if stop:
                        raise KeyboardInterrupt(f"interrupted: checkpoint {path} saved; rerun the same command to resume")
                    if at_stop and self.step < self.total_steps:
                        return path
            self._save_final()
            return final
        finally:
            if bar is not None:
                bar.close()
            if self._metrics_file is not None:
                self._metrics_file.close()
            for close in self._closers:
                close()

    def discard_if_nothing_saved(self) -> None:
        """After a failure: a run this process started that never reached a checkpoint leaves no
        folder behind (a corrected rerun then starts afresh, whatever it changed)."""
        if not (self.dist.main and self.new_run) or self.checkpoints.latest() is not None:
            return
        import shutil

        for name in (CONFIG_FILE, METRICS_FILE, CHECKPOINTS_DIR):
            path = self.out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        with suppress(OSError):
            self.out.rmdir()  # only if nothing else (e.g. tensorboard logs) is in it

    def _save_ar_model(self) -> None:
        """The plain AR model at the end of stage 0 (the baseline that A3 models are compared with)."""
        self._save_model_dir(AR_DIR)

    def _save_final(self) -> None:
        self._save_model_dir(FINAL_DIR)


def train(config: TrainConfig) -> Path:
    """Run (or resume) the curriculum described by `config`; returns the folder of the final model.

    With `config.stop_after` set and reached early, returns that step's checkpoint folder instead.
    The stage-0 AR model, when stage 0 runs, is in `ar_model_dir(config.output)`.
    """
    trainer = Trainer(config)
    try:
        return trainer.fit()
    except Exception:
        trainer.discard_if_nothing_saved()
        raise
    finally:
        if trainer.dist.enabled and dist.is_initialized():
            dist.destroy_process_group()


def ar_model_dir(output: str | Path) -> Path:
    return Path(output) / AR_DIR


def final_model_dir(output: str | Path) -> Path:
    return Path(output) / FINAL_DIR
